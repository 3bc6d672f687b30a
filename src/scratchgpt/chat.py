"""`python -m scratchgpt.chat`: runs `scratchgpt.apps.chat`, where the code lives."""

from scratchgpt.apps.chat import main

if __name__ == "__main__":
    main()
