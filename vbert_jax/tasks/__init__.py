"""What a trained VideoBERT does: zero-shot classification, text-to-video, forecasting.

`bundle` loads a run (config, parameters, text tokenizer, visual vocabulary) and runs the model;
`prompts` builds the task inputs through `vbert_jax.sequence`; `zero_shot`, `text_to_video` and
`forecast` are the tasks, each a library function and a command line; `strips` draws tokens as
pictures.
"""
