"""`python -m llava_cli`, so `torchrun -m llava_cli …` and `deepspeed --module llava_cli …` work."""

from llava_cli.cli import main

if __name__ == "__main__":
    main()
