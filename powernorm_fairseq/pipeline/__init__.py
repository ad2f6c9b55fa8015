"""Reproduction pipeline: prepare -> train -> average -> evaluate.

Each stage is a module with a ``main(argv)`` CLI; ``scripts/*.sh`` are thin wrappers around them.
The modules run fairseq through its command-line entry points (``python -m fairseq_cli.*``) with
``--user-dir powernorm_fairseq``, so they import fairseq only where they must (averaging and
evaluation never need the plugin's models).
"""
