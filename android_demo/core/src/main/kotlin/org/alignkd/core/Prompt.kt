package org.alignkd.core

/**
 * A bundle's `template.json` and the prompt path of alignkd/data/templates.py `build_prompt` +
 * alignkd/data/tokenize.py `tokenize_prompt` (MobileVLM's tokenizer_image_token): the question goes into
 * `prompt_format` unaltered, the prompt is split on the image token, each chunk is SentencePiece-encoded
 * on its own (each gets the dummy prefix), the image token index (-200) goes between chunks, one BOS first.
 */
class PromptTemplate(
    val name: String,
    val promptFormat: String,
    val imageToken: String = "<image>",
    val imageTokenIndex: Int = -200,
    val bosId: Int = 1,
    val stopIds: List<Int> = listOf(2)
) {
    companion object {
        const val QUESTION = "{question}"

        fun fromJson(m: Map<String, Any?>): PromptTemplate {
            val t = PromptTemplate(
                (m["name"] as? String) ?: "v1",
                J.str(m, "prompt_format"),
                (m["image_token"] as? String) ?: "<image>",
                if (m.containsKey("image_token_index")) J.int(m, "image_token_index") else -200,
                J.int(m, "bos_id"),
                J.ints(m, "stop_ids")
            )
            if (!t.promptFormat.contains(QUESTION)) throw JsonException("template.json: prompt_format has no $QUESTION")
            return t
        }

        /** MobileVLM's v1 template (what alignkd's exporter writes for `--template v1`). */
        val V1_SYSTEM = "A chat between a curious user and an artificial intelligence assistant. " +
            "The assistant gives helpful, detailed, and polite answers to the user's questions."

        fun v1(): PromptTemplate = PromptTemplate("v1", "$V1_SYSTEM USER: <image>\n{question} ASSISTANT:")
    }

    /** The prompt text; with [withImage] false the image token and its newline are left out (as build_prompt does). */
    fun build(question: String, withImage: Boolean = true): String {
        if (question.contains(imageToken)) {
            throw IllegalArgumentException("question contains '$imageToken'; the template inserts the image token itself")
        }
        var fmt = promptFormat
        if (!withImage) fmt = fmt.replace("$imageToken\n", "").replace(imageToken, "")
        val k = fmt.indexOf(QUESTION)
        return fmt.substring(0, k) + question + fmt.substring(k + QUESTION.length)
    }

    /** BOS + chunks joined by the image token index; at most one image token. */
    fun tokenize(prompt: String, tokenizer: SentencePieceBpe): IntArray {
        val chunks = prompt.split(imageToken)
        if (chunks.size > 2) throw IllegalArgumentException("prompt has ${chunks.size - 1} '$imageToken' tokens; at most one is supported")
        val ids = ArrayList<Int>()
        ids.add(bosId)
        for ((i, chunk) in chunks.withIndex()) {
            if (i > 0) ids.add(imageTokenIndex)
            for (id in tokenizer.encode(chunk)) ids.add(id)
        }
        return ids.toIntArray()
    }

    fun promptIds(question: String, tokenizer: SentencePieceBpe, withImage: Boolean = true): IntArray =
        tokenize(build(question, withImage), tokenizer)
}
