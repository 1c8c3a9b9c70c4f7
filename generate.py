"""Generate text: `python generate.py --prompt "Once upon a time"` (same as `mini-transformer generate`)."""

from mini_transformer.cli import run_as_script

if __name__ == "__main__":
    run_as_script("generate")
