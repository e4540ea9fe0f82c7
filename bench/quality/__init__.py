"""Quality benchmark of issue 3: perplexity and KL divergence against bits per weight.

Modules, one concern each:

    data       the float SmolLM2-135M folder and the KJV text, split and tokenized into fixed windows
    metrics    the float reference (cached log-probs) and ``Evaluator.evaluate(logits_fn) -> Metrics``
    bits       bpw of the block linears, counted the same way for every method
    context    ``Context`` (what a method gets) and ``Row`` (what it returns)
    methods    the registry ``METHODS``: name -> callable(Context) -> list[Row]
    rtn        uniform RTN at qcompile's formats
    llamacpp   llama.cpp's types, with and without an imatrix
    ort        onnxruntime's MatMulNBits quantizers
    results    merging rows into the JSON file and plotting

The driver is ``bench/quality.py``.
"""
