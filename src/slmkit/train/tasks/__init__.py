"""The built-in training tasks, one module each; each registers itself with ``slmkit.train.registry``.

pretrain (causal LM on packed shards), sft (chat fine-tuning, loss on the assistant's tokens), mlm (RoBERTa
masked-LM pretraining), classify (sequence classification), span_corruption (T5 pretraining) and seq2seq
(T5 fine-tuning on input/target records).
"""
