"""SavedModels for the front-door tests, beside tests/model_builders.py's: a TF1 export with TF
Serving's classify and regress signatures over serialized tf.Examples (as Estimators export)."""
from __future__ import annotations

import os

import numpy as np

WEIGHTS = np.array([[1.0, -1.0], [0.5, 2.0]], np.float32)
REGRESS_W = np.array([0.5, 1.5], np.float32)
LABELS = [b"neg", b"pos"]


def build_classify(base: str) -> str:
    """`classify` (classes, scores), `regress` (outputs) and `serving_default` = classify, all on
    string input `inputs`: tf.Examples with a float feature x of 2 values."""
    import tensorflow as tf

    g = tf.Graph()
    with g.as_default():
        examples = tf.compat.v1.placeholder(tf.string, [None], name="tf_example")
        x = tf.io.parse_example(examples, {"x": tf.io.FixedLenFeature([2], tf.float32)})["x"]
        w = tf.compat.v1.Variable(WEIGHTS, name="w", use_resource=False)
        scores = tf.nn.softmax(tf.matmul(x, w))
        classes = tf.tile(tf.constant([LABELS]), [tf.shape(x)[0], 1])
        regression = tf.reduce_sum(x * tf.constant(REGRESS_W), axis=1)
        sm = tf.compat.v1.saved_model
        classify = sm.classification_signature_def(examples, classes, scores)
        regress = sm.regression_signature_def(examples, regression)
        with tf.compat.v1.Session() as s:
            s.run(tf.compat.v1.global_variables_initializer())
            builder = sm.Builder(os.path.join(base, "1"))
            builder.add_meta_graph_and_variables(s, ["serve"], signature_def_map={
                "serving_default": classify, "classify": classify, "regress": regress})
            builder.save()
    return base


def expected_scores(x: np.ndarray) -> np.ndarray:
    logits = x.astype(np.float32) @ WEIGHTS
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def expected_regression(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.float32) * REGRESS_W).sum(axis=1)


def build_complex(base: str) -> str:
    """y = 2x (float32) and z = x + xi (complex64): the z output cannot travel (a 500)."""
    import tensorflow as tf

    class WithComplexOutput(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
        def serve(self, x):
            return {"y": x * 2.0, "z": tf.complex(x, x)}

    module = WithComplexOutput()
    tf.saved_model.save(module, os.path.join(base, "1"), signatures={"serving_default": module.serve})
    return base
