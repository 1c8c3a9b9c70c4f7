"""Train a model: `python train.py --config config.yaml [--resume]` (same as `mini-transformer train`)."""

from mini_transformer.cli import run_as_script

if __name__ == "__main__":
    run_as_script("train")
