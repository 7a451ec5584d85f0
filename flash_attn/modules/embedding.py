raise ImportError('flash_attn.modules.embedding (GPT2Embeddings, BertEmbeddings) is not provided by this build of flash_attn; use torch.nn.Embedding instead.')
