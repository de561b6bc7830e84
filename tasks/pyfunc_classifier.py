"""The MLflow pyfunc model (models-from-code) that wraps a fine-tuned classifier for `predict`.

Input: a DataFrame with a `text` column (or a list of strings); output: a DataFrame with the predicted
`label` and one `prob_<label>` column per class. Texts are cut to the length the classifier was trained
on, exactly as in training (`llmcore.classify.encode_texts`). The weights (with their label names) and the
tokenizer travel as artifacts; `llmcore` travels as a code path.
"""

import mlflow
import pandas as pd


class GPTClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from llmcore.classify import load_classifier
        from llmcore.tokenizer import Tokenizer

        self.model, self.labels, self.max_length = load_classifier(context.artifacts["model"])
        self.tokenizer = Tokenizer.load(context.artifacts["tokenizer"])

    # A DataFrame is what pyfunc hands over under the logged signature (a list only in direct calls);
    # MLflow infers no schema from that hint, so the logged signature stays the one that counts.
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        from llmcore.classify import encode_texts, predict_proba

        texts = model_input["text"] if isinstance(model_input, pd.DataFrame) else model_input
        rows, _ = encode_texts(self.tokenizer, [str(t) for t in texts], self.max_length)
        probabilities = predict_proba(self.model, rows)
        out = pd.DataFrame(probabilities.numpy(), columns=[f"prob_{label}" for label in self.labels])
        out.insert(0, "label", [self.labels[i] for i in probabilities.argmax(dim=-1).tolist()])
        return out


mlflow.models.set_model(GPTClassifier())
