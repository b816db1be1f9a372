"""Native model implementations: one decoder module shared by the Llama, Mistral, Qwen2 and Qwen3 families."""
