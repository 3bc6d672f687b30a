"""`python -m scratchgpt.classify`: runs `scratchgpt.apps.classify`, where the code lives."""

from scratchgpt.apps.classify import main

if __name__ == "__main__":
    main()
