"""The engines a worker can run its models with, behind one interface.

- ``protocol.py``: the ``Engine`` interface the runtime sees, and the
  records an engine makes (``Choice``, ``Update``, ``Refused``);
- ``emitter.py``: an engine's live choices and their events;
- ``batchers.py``: how updates reach the emitter (``Pump``, ``LoopBatcher``);
- ``loop.py``: the skeleton of an engine whose requests are asyncio tasks;
- ``registry.py``: the engines by name, their options, how a plug-in
  engine is found;
- the engines, one module (or package) each, each declaring itself
  (``ENGINE``):

  - ``transformers/`` (default): llmq's own continuous batching over the
    model's transformers forward; every Hugging Face causal LM, 8-bit and
    4-bit bitsandbytes loading;
  - ``vllm.py``: vLLM's async engine in the worker process; installed in a
    virtualenv of its own (it pins an older transformers); ``vllm_plugin.py``
    makes vLLM's processes die with the worker;
  - ``llamacpp.py``: a ``llama-server`` child process the worker owns, for
    GGUF files; ``sse_client.py`` reads its token streams.

An engine's library (torch, vLLM, ...) is imported only when a model is
built with it, so a worker never imports the libraries of an engine it
does not run.
"""
