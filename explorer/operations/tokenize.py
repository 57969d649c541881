"""POST /tokenize: token ids and strings."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from ..session import Explorer
from .base import TextRequest, operation, shape


class Token(BaseModel):
    index: int
    token_id: int
    token_str: str


class TokenizeResponse(BaseModel):
    tokens: list[Token]


@operation("/tokenize", TextRequest, TokenizeResponse,
           "Token ids and strings (index 0 is BOS where GET /model's prepends_bos is true, else the "
           "text's first token).")
def tokenize(ex: Explorer, req: TextRequest) -> dict[str, Any]:
    ids, strs = ex.tokens(req.source)
    return shape(TokenizeResponse, tokens=[{"index": i, "token_id": t, "token_str": s}
                                           for i, (t, s) in enumerate(zip(ids, strs))])
