"""What a trained VideoBERT does: zero-shot classification, text-to-video, forecasting, retrieval.

`bundle` loads a run (config, parameters, text tokenizer, visual vocabulary) and runs the model;
`prompts` builds the task inputs through `vbert_jax.sequence`; `zero_shot`, `text_to_video`,
`forecast` and `retrieval` are the tasks, each a library function and a command line;
`annotations` reads captioned segments (YouCook II, MSR-VTT), `ranking` scores rankings,
`bag_of_tokens` is retrieval's baseline and shortlist, and `strips` draws tokens as pictures.
"""
