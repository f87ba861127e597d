"""`python -m storyexp [overrides]`: the same as the `storyexp` command."""

from storyexp.cli import main

if __name__ == "__main__":
    main()
