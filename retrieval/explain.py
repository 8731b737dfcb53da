"""Where a RAG answer looked: retrieve, answer, then one forward pass over prompt + answer
with the attention weights sown (train/explain.py: `answer_attention`).

Either generator of retrieval/rag.py works: the chat decoder (ChatML prompt, passages
numbered "[i] text", causal attention) or the shared transformer in prefix-LM mode
(packed [CLS] question [SEP] passages..., the packed part attended bidirectionally).
"""

import numpy as np

from retrieval.chat_generator import ChatGenerator, clean_answer
from train import explain


def explain_rag_answer(rag, question: str, k: int, top_tokens: int = 8) -> dict:
    """-> {"question", "answer", "pieces" (prompt + answer), "prompt_length",
    "attention": answer_attention's report, its passage spans also carrying the passage
    "id", retrieval "score" and "text"}."""
    if not question.strip():
        raise ValueError("Empty question: nothing to answer")
    scores, ids = rag.retriever.search([question], k)
    passage_ids = [str(i) for i in ids[0]]
    passages = [rag.retriever.passages[i] for i in passage_ids]
    gen, tok = rag.generator, rag.generator.tokenizer
    if isinstance(gen, ChatGenerator):
        prompt = gen.prompt_ids(question, passages)
        answer = gen.generate_ids([question], [passages])[0]
        spans = explain.chat_prompt_spans(tok, prompt, question, passages)
        prefix_mask = None
        text = clean_answer(tok.decode(answer))
    else:  # rag.Generator: prefix-LM over the packed prompt.
        tokens, lengths, _, used = gen.prompts([question], [passages])
        prompt = [int(t) for t in tokens[0, :lengths[0]]]
        answer = gen.generate_ids([question], [passages])[0][0]
        if tok.sep_id in answer:
            answer = answer[:answer.index(tok.sep_id)]
        question_ids, *passage_tokens = tok.encode_batch([question, *passages])
        spans = explain.packed_prompt_spans(question_ids, passage_tokens, used[0],
                                            len(prompt))
        prefix_mask = np.arange(len(prompt) + len(answer)) < len(prompt)
        text = gen.text(answer)
        passage_ids, passages = passage_ids[:used[0]], passages[:used[0]]
    ids = list(prompt) + list(answer)
    report = explain.answer_attention(gen.model, gen.params, ids, len(prompt), spans,
                                      prefix_mask=prefix_mask, top_tokens=top_tokens,
                                      tokenizer=tok)
    for i, (pid, passage) in enumerate(zip(passage_ids, passages), start=1):
        report["spans"][f"passage {i}"].update(
            id=pid, score=float(scores[0][i - 1]), text=passage)
    return {"question": question, "answer": text, "answer_tokens": [int(t) for t in answer],
            "pieces": [tok.id_to_piece(int(t)) for t in ids], "prompt_length": len(prompt),
            "attention": report}
