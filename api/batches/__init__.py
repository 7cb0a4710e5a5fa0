"""OpenAI's Batch API (``/v1/batches``) and the files it reads and writes
(``/v1/files``): a keeper in each API process moves a batch through its life;
each line's job stores its result for the output file."""
