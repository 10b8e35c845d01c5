package org.alignkd.core

import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Test
import java.io.File

/** Token ids equal to SentencePiece's and to alignkd's prompt path (tokenize_prompt(build_prompt("v1", q))). */
class TokenizerVectorsTest {
    private val spec = Vectors.json("tokenizer.json")
    private val tok = SentencePieceBpe.fromJson(J.obj(Json.parse(File(Vectors.dir, J.str(spec, "vocab")).readBytes()), "vocab"))
    private val template = PromptTemplate.fromJson(
        J.obj(Json.parse(File(Vectors.dir, "bundles/base/template.json").readBytes()), "template"))

    private fun ids(v: Any?): IntArray = J.list(v, "ids").map { (it as Long).toInt() }.toIntArray()

    @Test
    fun rawTextsEncodeToSentencePieceIds() {
        val texts = J.list(spec["texts"], "texts").map { J.obj(it, "text") }
        for (t in texts) {
            val text = J.str(t, "text")
            assertArrayEquals("ids of ${Json.write(text)}", ids(t["ids"]), tok.encode(text))
        }
        println("tokenizer: ${texts.size} texts, ids equal to sentencepiece")
    }

    @Test
    fun idsDecodeToSentencePieceText() {
        for (t in J.list(spec["texts"], "texts").map { J.obj(it, "text") }) {
            assertEquals("decode of ${Json.write(t["text"])}", J.str(t, "decoded"), tok.decode(ids(t["ids"])))
        }
        for (d in J.list(spec["decodes"], "decodes").map { J.obj(it, "decode") }) {
            assertEquals("decode of ${d["ids"]}", J.str(d, "text"), tok.decode(ids(d["ids"])))
        }
    }

    @Test
    fun v1PromptsTokenizeAsPython() {
        val prompts = J.list(spec["prompts"], "prompts").map { J.obj(it, "prompt") }
        for (p in prompts) {
            val withImage = (p["with_image"] as? Boolean) ?: true
            val built = template.build(J.str(p, "question"), withImage)
            assertEquals(J.str(p, "prompt"), built)
            assertArrayEquals("ids of prompt for ${Json.write(p["question"])}", ids(p["ids"]), template.tokenize(built, tok))
        }
        println("tokenizer: ${prompts.size} v1 prompts, ids equal to tokenize_prompt")
    }

    @Test
    fun streamingDecodeHoldsBackIncompleteCharacters() {
        val ids = tok.encode("a 你")
        val partial = ids.copyOfRange(0, ids.size - 1) // last byte of 你 missing
        assertEquals(" a ", " " + tok.decode(partial, complete = false))
        assertEquals("a 你", tok.decode(ids, complete = false))
        assertTrue(tok.decode(partial).endsWith("\uFFFD"))
    }

    @Test
    fun imageTokenRules() {
        try {
            template.build("two <image> tokens")
            throw AssertionError("a question with <image> must be refused")
        } catch (e: IllegalArgumentException) {
        }
        try {
            template.tokenize("<image> and <image>", tok)
            throw AssertionError("two image tokens must be refused")
        } catch (e: IllegalArgumentException) {
        }
        assertEquals("<image>".length, "<image>".length)
        assertArrayEquals(intArrayOf(1, -200), template.tokenize("<image>", tok))
    }
}
