"""``python -m tformer.sample``: text from a trained DecoderLM (see :mod:`tformer.generation.sampling`)."""

from tformer.generation.sampling import main

if __name__ == "__main__":
    main()
