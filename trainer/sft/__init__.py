"""Supervised fine-tuning data: instruction / chat records -> tokens with a loss mask -> training rows.

    records.py   read jsonl / jsonl.gz / parquet / hf: records; the Alpaca, chat-messages and
                 prompt/completion layouts, detected or chosen, as one list of messages each
    template.py  the plain-text chat templates: messages -> text pieces that are trained or not;
                 the same template as a Jinja chat_template for Hugging Face tokenizers
    examples.py  messages -> token ids + mask (template applied, --max-seq-len truncation counted),
                 the held-out validation split
    store.py     the tokenized examples on disk (RUN/sft/), with what made them recorded
    stream.py    examples packed into (or padded to) training windows, addressed by the global
                 sample cursor like pretraining's windows, targets masked with IGNORE_INDEX
    data.py      SFTData: the data source `finetune` hands to pretrain's setup and loop

The loop (trainer/train/loop.py) is the one pretraining runs; only the data source and the model's shape differ.
"""
