"""A generated corpus of malformed (and a few valid) image files, for the input-boundary tests.

``python -m tests.corpus.malformed OUT`` writes it into ``OUT`` and lists every case; tests call
:func:`tests.corpus.malformed.build_corpus`.
"""
