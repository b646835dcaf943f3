"""The seed's methods: one module per paper (PET, FLAN, Orca 2, TinyGSM, distillation, EFT, ...).

A method module states its paper's algorithm in its docstring, declares its config section as a dataclass,
and registers its task(s) with ``slmkit.train.registry.register_task``; every module here is imported on
the first task lookup, so ``slm train CONFIG.yaml`` finds it. See ``README.md`` beside this file.
"""
