// hotmodel dashboard: the playground's knowledge of each inference endpoint, with no state
// of its own: an example body for a model, the text a plain answer or a stream's event
// carries, and a short summary of answers that are not text (vectors, token ids, scores).
"use strict";

window.hotmodelPlayground = (() => {
  const PROMPT = "Say hello in five words.";
  const MESSAGES = [{ role: "user", content: PROMPT }];

  // The endpoints the playground can try, in the picker's order: a label, whether the
  // answer streams, and the example body (without `model`; `tokens`: the last token ids
  // /tokenize gave for this model, for /detokenize).
  const ENDPOINTS = {
    "/v1/chat/completions": {
      label: "chat", streams: true,
      example: () => ({ messages: MESSAGES, max_tokens: 32 }),
    },
    "/v1/messages": {
      label: "Anthropic messages", streams: true,
      example: () => ({ max_tokens: 32, messages: MESSAGES }),
    },
    "/v1/responses": {
      label: "OpenAI responses", streams: true,
      example: () => ({ input: PROMPT, max_output_tokens: 32 }),
    },
    "/v1/completions": {
      label: "completions", streams: true,
      example: () => ({ prompt: "The capital of France is", max_tokens: 16 }),
    },
    "/completion": {
      label: "completion (llama.cpp)", streams: true,
      example: () => ({ prompt: "The capital of France is", n_predict: 16 }),
    },
    "/infill": {
      label: "infill", streams: true,
      example: () => ({ input_prefix: "def add(a, b):\n    return ", input_suffix: "\n", n_predict: 16 }),
    },
    "/v1/embeddings": {
      label: "embeddings", streams: false,
      example: () => ({ input: "A cat sat on the mat." }),
    },
    "/v1/rerank": {
      label: "rerank", streams: false,
      example: () => ({
        query: "What is a cat?",
        documents: ["A cat is a small furry animal.", "Paris is in France."],
      }),
    },
    "/tokenize": {
      label: "tokenize", streams: false,
      example: () => ({ content: "Hello, world!", with_pieces: true }),
    },
    "/detokenize": {
      label: "detokenize", streams: false,
      example: (tokens) => ({ tokens: tokens || [1, 2, 3] }),
    },
    "/apply-template": {
      label: "apply template", streams: false,
      example: () => ({ messages: [{ role: "system", content: "Answer concisely." }, ...MESSAGES] }),
    },
    "/v1/messages/count_tokens": {
      label: "count tokens (Anthropic)", streams: false,
      example: () => ({ messages: MESSAGES }),
    },
  };
  const CHAT = "/v1/chat/completions";
  const RESPONSES = "/v1/responses";

  // What the picker offers for a model of /v1/models: the endpoints it serves (its
  // `endpoints`) that the playground knows, in the order above.
  function endpointsFor(model) {
    const served = new Set((model && model.endpoints) || []);
    return Object.keys(ENDPOINTS).filter((path) => served.has(path));
  }

  function example(path, model, tokens) {
    return { model, ...ENDPOINTS[path].example(tokens) };
  }

  function streams(path) {
    return Boolean(ENDPOINTS[path] && ENDPOINTS[path].streams);
  }

  function label(path) {
    return ENDPOINTS[path] ? `${ENDPOINTS[path].label} (${path})` : path;
  }

  // The text one server-sent event of a stream adds (null: none).
  function delta(path, event, data) {
    if (!data || typeof data !== "object") return null;
    if (path === CHAT) return data.choices && data.choices[0] && data.choices[0].delta ? data.choices[0].delta.content || null : null;
    if (path === "/v1/completions") return data.choices && data.choices[0] ? data.choices[0].text || null : null;
    if (path === "/completion" || path === "/infill") return data.content || null;
    if (path === "/v1/messages") return data.type === "content_block_delta" && data.delta ? data.delta.text || null : null;
    if (path === RESPONSES) return data.type === "response.output_text.delta" ? data.delta || null : null;
    return null;
  }

  // The error an event of a stream carries (null: none).
  function streamError(event, data) {
    if (event === "error" || (data && typeof data === "object" && data.error)) {
      const error = data && (data.error || data);
      return (error && error.message) || JSON.stringify(data);
    }
    return null;
  }

  function preview(values, count = 5) {
    const head = values.slice(0, count).map((v) => Number(v).toFixed(4));
    return `[${head.join(", ")}${values.length > count ? ", …" : ""}]`;
  }

  // What a plain answer says, as lines of text.
  function answer(path, body) {
    if (path === CHAT) return [((body.choices || [])[0] || {}).message?.content ?? ""];
    if (path === "/v1/completions") return [((body.choices || [])[0] || {}).text ?? ""];
    if (path === "/completion" || path === "/infill") return [body.content ?? ""];
    if (path === "/v1/messages") return [(body.content || []).map((block) => block.text || "").join("")];
    if (path === RESPONSES) {
      if (typeof body.output_text === "string") return [body.output_text];
      const parts = (body.output || []).flatMap((item) => item.content || []);
      return [parts.map((part) => part.text || "").join("")];
    }
    if (path === "/v1/embeddings" || path === "/embeddings") {
      const items = Array.isArray(body) ? body : body.data || [];
      return items.map((item, i) => {
        const vector = Array.isArray(item.embedding[0]) ? item.embedding[0] : item.embedding;
        return `vector ${item.index ?? i}: ${vector.length} values ${preview(vector)}`;
      });
    }
    if (path === "/tokenize") {
      const tokens = body.tokens || [];
      const shown = tokens.map((t) => (typeof t === "object" ? `${t.id} ${JSON.stringify(t.piece)}` : String(t)));
      return [`${tokens.length} tokens`, ...shown];
    }
    if (path === "/detokenize") return [body.content ?? ""];
    if (path === "/apply-template") return [body.prompt ?? ""];
    if (path === "/v1/messages/count_tokens") return [`${body.input_tokens} input tokens`];
    if (path === "/v1/rerank") {
      return (body.results || []).map((r) => `document ${r.index}: relevance ${Number(r.relevance_score).toFixed(4)}`);
    }
    return [JSON.stringify(body)];
  }

  // Token ids of a /tokenize answer (with or without pieces), for the next /detokenize.
  function tokenIds(body) {
    return (body.tokens || []).map((t) => (typeof t === "object" ? t.id : t));
  }

  return { endpointsFor, example, streams, label, delta, streamError, answer, tokenIds };
})();
