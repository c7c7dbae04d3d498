"""The studies behind the measured tables (see README.md here). Run from the repository root as
modules, `python -m benchmarks.ptq_table ...`, or as scripts, `python benchmarks/ptq_table.py ...`;
either way they use only the installed package's public API (`pip install -e .`)."""
