"""``lslo demo``: the paper's experiment on artificial languages, on a laptop CPU, with no download.

- :mod:`lslo.demo.synthetic`: the artificial languages (stand-in M2M-100 codes, three resource
  groups, relatives, different word orders and morphology) and the multi-way corpus in the
  FLORES-101 layout plus an imbalanced pretraining TSV.
- :mod:`lslo.demo.base_model`: the SentencePiece tokenizer (an ``M2M100Tokenizer``) and the tiny
  M2M-100 pretrained on that TSV with :func:`lslo.train.train`; zero-shot scores per direction group.
"""
