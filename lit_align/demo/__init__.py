"""`lit-align demo`: the embedded end-to-end example on SmolLM2-135M-Instruct."""
