"""The credential headers of the common model APIs: the one table of what partitions the cache by default.

Two requests that differ in any of these headers never share a cache entry, so a client without a
credential, or with another one, never gets an answer a paying tenant's credential bought. Pure data:
`keys.py` takes `DEFAULT_PARTITION_HEADERS` and adds the names in the option `cache_partition_headers`.

Names are lower case (HTTP field names are case-insensitive); the reason says which API sends the header.
docs/privacy.md (Credentials partition the cache) shows the same table.

>>> "x-goog-api-key" in DEFAULT_PARTITION_HEADERS
True
>>> all(name == name.lower() for name in DEFAULT_PARTITION_HEADERS)
True
"""

from __future__ import annotations

# name (lower case) -> why it partitions: whose credential or tenant it carries
CREDENTIAL_HEADERS: dict[str, str] = {
    "authorization": "Bearer keys of OpenAI, Cohere, Hugging Face, Mistral and most others; AWS SigV4",
    "x-api-key": "Anthropic's API key, and the generic key header of many gateways",
    "api-key": "Azure OpenAI's key header",
    "x-goog-api-key": "Google Gemini / Vertex API key",
    "x-goog-user-project": "Google Cloud: the project billed for the request",
    "openai-organization": "OpenAI: the organisation billed; orgs must not share answers",
    "openai-project": "OpenAI: the project billed; projects must not share answers",
    "x-hf-bill-to": "Hugging Face Inference Providers: the organisation billed",
    "ocp-apim-subscription-key": "Azure API Management subscription key in front of Azure OpenAI",
    "x-amz-security-token": "AWS Bedrock: the session token of temporary credentials",
    "cookie": "browser sessions: any cookie may carry a login",
}

DEFAULT_PARTITION_HEADERS: tuple[str, ...] = tuple(CREDENTIAL_HEADERS)
