from lit_align.data.render import as_messages, encode_pair, encode_prompt, encode_response, render_prompt
from lit_align.data.rerank import ReRanker

__all__ = ["ReRanker", "as_messages", "encode_pair", "encode_prompt", "encode_response", "render_prompt"]
