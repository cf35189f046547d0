"""A worker process: pinned to its own cores, it maps each version's segment read-only, runs the
rewritten graph in one TF session per version over zero-copy views of the tables, and answers the
broker's requests (one at a time, or through TF Serving-style batching). Forked from a zygote that
imported TensorFlow once. Imports shared modules and the models package, never the broker."""
