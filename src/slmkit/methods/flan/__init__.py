"""FLAN / Flan-T5 instruction tuning (Wei et al. 2022; Chung et al. 2022), groundwork.

Algorithm: phrase every training example of many datasets with one of ten hand-written templates of its
dataset (some "turned around"), add an OPTIONS suffix for classification, mix the datasets in proportion
to their size with a cap K = 3,000 per dataset (Flan 2022: zero/few-shot, with/without options, 5 %
chain-of-thought), fine-tune on the targets only, and evaluate zero-shot on a task cluster held out of
training, by rank classification over the options.

Here so far: the templates read from FLAN's files (``templates``), the datasets of ``../shared/data``
in FLAN's fields (``sources``), the mixture builder (``mixture``) and held-out zero-shot scoring
(``zero_shot``). The ``slm flan`` command and its experiment are not built yet (issue 16).
"""
