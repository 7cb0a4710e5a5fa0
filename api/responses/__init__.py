"""OpenAI's Responses API (``/v1/responses``): every response is a Redis
stream of its job's events, folded into the answer; each API process's
keeper looks after responses nobody's request waits on."""
