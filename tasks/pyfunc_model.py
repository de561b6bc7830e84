"""The MLflow pyfunc model (models-from-code) that wraps a trained GPT for `predict`.

Input: a list of prompt strings (or a DataFrame with a `prompt` column); output: one completion per prompt.
Sampling settings come from `params` (max_new_tokens, temperature, top_k, top_p, seed; top_k 0
and top_p 1.0 turn those filters off). The weights,
tokenizer and a small JSON config travel as artifacts; `llmcore` travels as a code path. A chat model's
prompts are cut as in fine-tuning, at the `max_length` stored with its weights (`llmcore.chat`).
"""

import json

import mlflow
import pandas as pd


class GPTGenerator(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from llmcore.chat import chat_max_length
        from llmcore.checkpoint import load_model
        from llmcore.sampling import keep_decoding_layout
        from llmcore.tokenizer import Tokenizer

        self.model = load_model(context.artifacts["model"])
        keep_decoding_layout(self.model)  # a served model only generates: no layout copies per call
        self.max_length = chat_max_length(context.artifacts["model"])  # prompts are cut as in fine-tuning
        self.tokenizer = Tokenizer.load(context.artifacts["tokenizer"])
        with open(context.artifacts["config"]) as f:
            self.chat = json.load(f)["chat"]

    # A DataFrame is what pyfunc hands over under the logged signature (a list only in direct calls);
    # MLflow infers no schema from that hint, so the logged signature stays the one that counts.
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        from llmcore.chat import chat_prompt
        from llmcore.sampling import SamplingConfig, generate_batch

        if isinstance(model_input, pd.DataFrame):  # MLflow turns a list of strings into a one-column frame
            column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
            prompts = model_input[column].tolist()
        else:
            prompts = list(model_input)
        given = {k: v for k, v in (params or {}).items() if k in SamplingConfig.__dataclass_fields__}
        # The signature needs concrete defaults: top_k 0 and top_p 1.0 mean "no filtering".
        given["top_k"] = given.get("top_k") or None
        given["top_p"] = given["top_p"] if given.get("top_p", 1.0) < 1.0 else None
        config = SamplingConfig(**given)
        tokenizer = self.tokenizer
        stop = tokenizer.end_id if self.chat else tokenizer.eot_id
        ids = [
            chat_prompt(tokenizer, prompt, self.max_length) if self.chat else tokenizer.encode(prompt)
            for prompt in map(str, prompts)
        ]
        return [tokenizer.decode(new) for new in generate_batch(self.model, ids, config, stop_id=stop)]


mlflow.models.set_model(GPTGenerator())
