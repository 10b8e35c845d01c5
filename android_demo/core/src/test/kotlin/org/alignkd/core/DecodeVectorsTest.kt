package org.alignkd.core

import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Test
import java.io.File

/**
 * The decode loop against export/runtime.py `generate` on the same fake runtime (integer arithmetic,
 * specified in tests/export/helpers/fake_runtime.py `FakeRuntime`): same tokens, same prompt length, same calls in the
 * same order with the same start positions. The image goes through this module's preprocessing, so the
 * fake's pixel count also checks the pixels end to end.
 */
class DecodeVectorsTest {
    private val spec = Vectors.json("decode.json")

    class FakeRuntime(val vocab: Int, val nImg: Int, val eos: Int, val eosAfter: Int?) : VlmRuntime {
        var s = 0L
        var length = 0
        private val states = ArrayList<Long>() // the hash after each position: decoding below length rewinds to it
        val calls = ArrayList<List<Int>>()

        override fun encodeImage(pixels: FloatArray, imageSize: Int): Embeddings {
            var c = 0
            for (x in pixels) if (x > 0f) c++
            calls.add(listOf(-1, nImg))
            val d = FloatArray(nImg * 4)
            for (i in 0 until nImg) {
                d[4 * i] = (1000 + (c + i) % 97).toFloat(); d[4 * i + 1] = i.toFloat(); d[4 * i + 2] = 2f
            }
            return Embeddings(nImg, 4, d)
        }

        override fun embed(ids: LongArray): Embeddings {
            calls.add(listOf(-2, ids.size))
            val d = FloatArray(ids.size * 4)
            for ((i, id) in ids.withIndex()) {
                d[4 * i] = id.toFloat(); d[4 * i + 1] = ((7 * id) % 13).toFloat(); d[4 * i + 2] = 1f
            }
            return Embeddings(ids.size, 4, d)
        }

        override fun decode(embeds: Embeddings, startPos: Int): FloatArray {
            calls.add(listOf(-3, startPos, embeds.rows))
            check(startPos <= length) { "decode at $startPos, cache holds $length" }
            while (states.size > startPos) states.removeAt(states.size - 1) // dropped from startPos on (0: new)
            s = if (states.isEmpty()) 0L else states[states.size - 1]
            for (j in 0 until embeds.rows) {
                val r = embeds.row(j)
                s = (31 * s + 3 * r[0].toLong() + r[1].toLong() + r[2].toLong() + startPos + j) % 1000003
                states.add(s)
            }
            length = startPos + embeds.rows
            val a = 2 * (s % (vocab / 2)) + 1
            val logits = FloatArray(vocab) { ((a * it + s) % vocab).toFloat() }
            if (eosAfter != null && length >= eosAfter) logits[eos] = vocab.toFloat()
            return logits
        }

        /** The Python log's form: ["encode_image", N], ["embed", T], ["decode", start, T]. */
        fun log(): List<List<Any>> = calls.map {
            when (it[0]) {
                -1 -> listOf<Any>("encode_image", it[1].toLong())
                -2 -> listOf<Any>("embed", it[1].toLong())
                else -> listOf<Any>("decode", it[1].toLong(), it[2].toLong())
            }
        }
    }

    @Test
    fun everyCaseMatchesPythonGenerate() {
        val vocab = J.int(spec, "vocab_size")
        val nImg = J.int(spec, "num_image_tokens")
        val eos = J.int(spec, "eos_id")
        val images = Vectors.json("images.json")
        val configs = J.obj(images["configs"], "configs")
        val cases = J.list(spec["cases"], "cases").map { J.obj(it, "case") }
        for (c in cases) {
            val name = J.str(c, "name")
            val eosAfter = (c["eos_after"] as? Long)?.toInt()
            val maxSeq = (c["max_seq_len"] as? Long)?.toInt()
            val rt = FakeRuntime(vocab, nImg, eos, eosAfter)
            var pixels: FloatArray? = null
            var size = 0
            if (c["image"] != null) {
                val im = J.obj(c["image"], "image")
                val cfg = PreprocessingConfig.fromJson(J.obj(configs[J.str(im, "config")], "config"))
                pixels = ImagePreprocessor.preprocess(Vectors.loadRgb(File(Vectors.dir, "images/" + J.str(im, "file"))), cfg)
                size = cfg.imageSize
                assertEquals(J.int(spec, "positive_pixels"), pixels.count { it > 0f })
            }
            val ids = J.ints(c, "prompt_ids").toIntArray()
            val gen = Generator(rt, nImg, -200, maxSeq)
            if (c.containsKey("error")) {
                try {
                    gen.generate(ids, pixels, size, J.int(c, "max_new_tokens"), listOf(eos))
                    throw AssertionError("$name: expected ${c["error"]}")
                } catch (e: GenerationException) {
                    assertTrue("$name: ${e.message}", e.message!!.contains("exceeds max_seq_len"))
                }
            } else {
                val streamed = ArrayList<Int>()
                val g = gen.generate(ids, pixels, size, J.int(c, "max_new_tokens"), listOf(eos), SamplingConfig(),
                    object : TokenListener {
                        override fun onToken(token: Int, index: Int): Boolean { streamed.add(token); return true }
                    })
                assertArrayEquals("$name: tokens", J.ints(c, "tokens").toIntArray(), g.tokens)
                assertEquals("$name: streamed tokens", J.ints(c, "tokens"), streamed)
                assertEquals("$name: prompt length", J.int(c, "prompt_len"), g.promptLen)
                assertEquals("$name: decode steps", maxOf(g.tokens.size - 1, 0), g.timings.decodeSteps)
            }
            assertEquals("$name: runtime calls", Json.write(c["calls"]), Json.write(rt.log()))
        }
        println("decode: ${cases.size} cases, tokens and runtime calls equal to export/runtime.py generate")
    }

    @Test
    fun imageAndPromptMustAgree() {
        val rt = FakeRuntime(16, 2, 2, null)
        val g = Generator(rt, 2)
        for ((ids, px) in listOf(Pair(intArrayOf(1, -200, 5), null), Pair(intArrayOf(1, 5), FloatArray(3)),
                                 Pair(intArrayOf(1, -200, -200), FloatArray(3)))) {
            try {
                g.generate(ids, px, 1, 4, listOf(2))
                throw AssertionError("must refuse ${ids.toList()}")
            } catch (e: GenerationException) {
            }
        }
        assertTrue(rt.calls.isEmpty())
    }

    @Test
    fun listenerCanStopAndTimingsAreConsistent() {
        var t = 0L
        val rt = FakeRuntime(64, 2, 2, null)
        val g = Generator(rt, 2, clock = { t += 1_000_000; t })
        val out = g.generate(intArrayOf(1, 5, 6), null, 0, 50, listOf(-1), SamplingConfig(), object : TokenListener {
            override fun onToken(token: Int, index: Int): Boolean = index < 2
        })
        assertEquals(3, out.tokens.size)
        assertTrue(out.timings.ttftS > 0 && out.timings.prefillTokS > 0 && out.timings.decodeTokS > 0)
        assertEquals(3, out.promptLen)
    }
}
