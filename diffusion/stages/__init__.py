"""One module per dvc.yaml stage, each with `main(argv) -> exit code` and every path it reads or writes on its command
line (required: dvc.yaml passes them); `python -m diffusion.cli <stage> ...` dispatches here."""
