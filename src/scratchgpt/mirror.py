"""`python -m scratchgpt.mirror`: runs `scratchgpt.data.mirror`, where the code lives."""

from scratchgpt.data.mirror import main

if __name__ == "__main__":
    main()
