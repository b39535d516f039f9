"""Everything that reads a file and lets its contents decide something, kept in one small place.

``state_file`` reads and writes safetensors with a JSON header; ``references`` turns an
architecture reference from a header into a model, only through an allow-list; ``provenance`` is
the typed record of where a pruned model came from; ``checkpoint`` saves and loads whole models.
Nothing here imports or calls anything that a file names, unless the caller opts in.
"""
