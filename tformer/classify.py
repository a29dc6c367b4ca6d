"""``python -m tformer.classify``: labels for text from a trained classifier (see :mod:`tformer.generation.classify`)."""

from tformer.generation.classify import main

if __name__ == "__main__":
    main()
