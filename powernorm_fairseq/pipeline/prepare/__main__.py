"""``python -m powernorm_fairseq.pipeline.prepare``: see the package docstring."""

from powernorm_fairseq.pipeline.prepare import main

if __name__ == "__main__":
    main()
