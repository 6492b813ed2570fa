"""`python -m tokenskip ...`: the CLI, for launchers that take a module (torchrun -m, accelerate launch -m)."""

from tokenskip.cli import main

if __name__ == "__main__":
    main()
