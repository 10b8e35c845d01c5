package org.alignkd.core

import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Test
import java.io.File

class JsonTest {
    private fun bad(s: String) {
        try {
            Json.parse(s)
            fail("should be refused: $s")
        } catch (e: JsonException) {
        }
    }

    @Test
    fun acceptsWhatPythonAccepts() {
        val m = J.obj(Json.parse("""{"a": [1, -2.5e3, true, null, "x\u00e9\n"], "b": NaN, "c": -Infinity, "a": 7}"""), "m")
        assertEquals(7L, m["a"])
        assertTrue((m["b"] as Double).isNaN())
        assertEquals(Double.NEGATIVE_INFINITY, m["c"])
        assertEquals(listOf("é😀"), Json.parse("[\"\\u00e9\\ud83d\\ude00\"]"))
        assertEquals(12345678901234L, Json.parse(" 12345678901234 "))
        assertEquals(1e400, Json.parse("1e400"))
    }

    @Test
    fun refusesWhatPythonRefuses() {
        for (s in listOf("", "{", "[1,]", "{\"a\":1,}", "01", "1.", ".5", "-", "+1", "'a'", "{a:1}", "[1] x",
                         "\"tab\there\"", "\"\\x\"", "\uFEFF{}", "tru", "[1 2]", "{\"a\" 1}", "// c\n{}", "\"\\u12\"")) bad(s)
        try {
            Json.parse(byteArrayOf(0x22, 0xFF.toByte(), 0x22))
            fail("invalid UTF-8 must be refused")
        } catch (e: JsonException) {
        }
    }

    @Test
    fun writesAndReadsBack() {
        val v = linkedMapOf<String, Any?>("s" to "a\"b\\c\n\u0001", "n" to 3, "d" to 0.25, "l" to listOf(1, 2), "z" to null)
        val back = J.obj(Json.parse(Json.write(v, indent = 2)), "v")
        assertEquals("a\"b\\c\n\u0001", back["s"])
        assertEquals(3L, back["n"])
        assertEquals(0.25, back["d"])
        assertEquals(listOf(1L, 2L), back["l"])
        assertTrue(back.containsKey("z"))
    }
}

class SamplerTest {
    @Test
    fun temperatureZeroIsArgmaxFirstMaximum() {
        assertEquals(1, Sampler(SamplingConfig()).next(floatArrayOf(0f, 3f, 3f, 1f)))
    }

    @Test
    fun tinyTopPIsGreedyAndSamplingFollowsTheDistribution() {
        val logits = floatArrayOf(0f, Math.log(3.0).toFloat(), 0f, -100f)
        assertEquals(1, Sampler(SamplingConfig(1.0, 0.01, 5)).next(logits))
        val s = Sampler(SamplingConfig(1.0, 1.0, 42))
        val counts = IntArray(4)
        for (i in 0 until 20000) counts[s.next(logits)]++
        assertEquals(0.6, counts[1] / 20000.0, 0.02) // 3 / (1 + 3 + 1)
        assertEquals(0, counts[3])
        val again = Sampler(SamplingConfig(1.0, 1.0, 42))
        val s2 = Sampler(SamplingConfig(1.0, 1.0, 42))
        assertEquals((0 until 50).map { again.next(logits) }, (0 until 50).map { s2.next(logits) })
    }
}

class BenchmarkTest {
    @Test
    fun writesTheBenchFields() {
        val r = BenchmarkResult("tiny", "pte", "8da4w", 3, 0.5, 0.01, 0.2, 0.15, 300.0, 25.0, 512.0)
        val tmp = Vectors.tempDir("bench")
        try {
            val f = File(tmp, "bench.json")
            r.writeTo(f)
            val m = J.obj(Json.parse(f.readBytes()), "bench")
            assertEquals(BenchmarkResult.FIELDS, m.keys.toList())
            assertEquals(3L, m["n_runs"])
            assertEquals(25.0, m["decode_tok_s"])
            assertEquals(0.15, m["ttft_warm_s"])
        } finally {
            tmp.deleteRecursively()
        }
        assertEquals(2.0, BenchmarkResult.median(listOf(3.0, 1.0, 2.0)), 0.0)
        assertEquals(2.5, BenchmarkResult.median(listOf(4.0, 1.0, 2.0, 3.0)), 0.0)
        assertEquals(0.1235, BenchmarkResult.round(0.123456, 4), 0.0)
        assertEquals(2.0, BenchmarkResult.round(2.5, 0), 0.0) // half-even, as Python's round
        assertEquals(2.7, BenchmarkResult.round(2.675, 1), 0.0)
    }

    @Test
    fun aggregatesAsTheHostBench() {
        fun g(image: Double, prefill: Double, decode: Double, steps: Int) =
            Generation(IntArray(steps + 1), 100, Timings(image, prefill, decode, steps, 0.0, 100), false)
        val warm = listOf(g(0.001, 0.5, 0.0, 0), g(0.003, 0.4, 0.0, 0), g(0.002, 0.2, 0.0, 0))
        val r = BenchmarkResult.fromRuns("b", "pte", "8da4w", 1.5,
            listOf(g(0.1, 0.5, 1.0, 10), g(0.3, 0.25, 1.0, 20), g(0.2, 1.0, 1.0, 0)), warm, 300.0)
        assertEquals(0.2, r.imageEncodeS, 1e-12)
        assertEquals(0.2 + 0.5, r.ttftS, 1e-12)
        assertEquals(0.403, r.ttftWarmS, 1e-12) // median of the warm asks' image + prefill
        assertEquals(200.0, r.prefillTokS, 1e-9)
        assertEquals(15.0, r.decodeTokS!!, 1e-9) // median of 10 and 20; the run without steps is left out
        val none = BenchmarkResult.fromRuns("b", "pte", "q", 0.0, listOf(g(0.1, 0.5, 1.0, 0)), warm, 1.0)
        assertEquals(null, none.decodeTokS)
        assertTrue(none.toMap().containsKey("decode_tok_s"))
    }

    @Test
    fun headlessRunOverTheTestBundle() {
        val bundle = LoadedBundle.open(File(Vectors.dir, "bundles/base"))
        val image = Vectors.loadRgb(File(Vectors.dir, "images/easyvqa_0.png"))
        // a model that answers EOS at once: the benchmark still times its max_new_tokens - 1 decode steps
        var fake: DecodeVectorsTest.FakeRuntime? = null
        val r = Benchmark.run(bundle, { DecodeVectorsTest.FakeRuntime(512, bundle.model.numImageTokens, 2, 1).also { fake = it } },
            image, "What shape is in the image?", 2, 8, "fp32")
        // warm-up + 2 runs: a cold ask (prefill + 7 steps) and a warm one (prefill) each; the image encoded once per run
        assertEquals(3 * (8 + 1), fake!!.calls.count { it[0] == -3 })
        assertEquals(3, fake!!.calls.count { it[0] == -1 })
        assertEquals(2, r.nRuns)
        assertTrue(r.ttftWarmS > 0)
        assertEquals("base", r.bundle)
        assertTrue(r.decodeTokS!! > 0 && r.ttftS > 0 && r.loadS >= 0)
        assertTrue("peak RSS read from /proc", r.peakRssMb > 0)
        val session = VlmSession(bundle, DecodeVectorsTest.FakeRuntime(512, bundle.model.numImageTokens, 2, null))
        val seen = ArrayList<String>()
        val a = session.ask(image, "What shape is in the image?", 5, SamplingConfig(), object : AnswerListener {
            override fun onText(text: String, tokens: Int): Boolean { seen.add(text); return true }
        })
        assertEquals(5, a.generation.tokens.size)
        assertEquals(a.text, bundle.tokenizer.decode(a.generation.tokens))
        assertEquals(5, seen.size)
    }
}
