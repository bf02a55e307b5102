"""OpenAI-family providers: Chat Completions, Responses, Azure OpenAI, and their error table."""
