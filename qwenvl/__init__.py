"""qwenvl-ms: fine-tune Qwen vision-language models with MindSpore."""
