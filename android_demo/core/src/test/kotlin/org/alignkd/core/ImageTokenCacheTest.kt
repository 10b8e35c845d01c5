package org.alignkd.core

import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Assert.assertFalse
import org.junit.Assert.assertNull
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Test
import java.io.File

/** The image-token cache (same rules as export/runtime.py `ImageTokenCache`) and the one preprocessing path. */
class ImageTokenCacheTest {
    private val bundle by lazy { LoadedBundle.open(File(Vectors.dir, "bundles/base")) }
    private val image by lazy { Vectors.loadRgb(File(Vectors.dir, "images/easyvqa_0.png")) }

    private fun tokens(v: Float) = Embeddings(2, 2, floatArrayOf(v, v, v, v))

    /** A runtime that records the pixel count and image size of every encode. */
    class Recording(val inner: DecodeVectorsTest.FakeRuntime) : VlmRuntime by inner {
        val encodes = ArrayList<Pair<Int, Int>>()

        override fun encodeImage(pixels: FloatArray, imageSize: Int): Embeddings {
            encodes.add(Pair(pixels.size, imageSize))
            return inner.encodeImage(pixels, imageSize)
        }
    }

    private fun fake() = Recording(DecodeVectorsTest.FakeRuntime(512, bundle.model.numImageTokens, 2, null))

    @Test
    fun keyIsThePythonKey() {
        val cfg = PreprocessingConfig.fromJson(J.obj(J.obj(Vectors.json("images.json")["configs"], "configs")["tiny48"], "tiny48"))
        // ImageTokenCache.key of the same pixels in Python: tests/export/test_image_cache.py pins the same value
        assertEquals("9b44eea4b90586606580a86518b5d0d224ddb7ced70f28c5087bc07493bd98b5",
            ImageTokenCache.key(ImagePreprocessor.preprocess(image, cfg)))
    }

    @Test
    fun leastRecentlyUsedIsEvicted() {
        val c = ImageTokenCache(2)
        c.put("a", tokens(1f))
        c.put("b", tokens(2f))
        assertEquals(1f, c.get("a")!!.data[0]) // hit: "a" becomes the most recent
        assertEquals(listOf("b", "a"), c.keys())
        c.put("c", tokens(3f))
        assertEquals(listOf("a", "c"), c.keys())
        assertNull(c.get("b"))
        val zero = ImageTokenCache(0)
        zero.put("a", tokens(1f))
        assertNull(zero.get("a"))
        assertEquals(0, zero.size)
        try {
            ImageTokenCache(-1)
            fail("a negative capacity must be refused")
        } catch (e: IllegalArgumentException) {
        }
    }

    @Test
    fun followUpSkipsTheEncoderAndAChangedImageIsAMiss() {
        val rt = fake()
        val session = VlmSession(bundle, rt, 2)
        val q = "What shape is in the image?"
        val cold = session.ask(image, q, 4)
        assertFalse(cold.generation.timings.imageCached)
        val warm = session.ask(image, q, 4)
        assertTrue(warm.generation.timings.imageCached)
        assertEquals(1, rt.encodes.size) // the follow-up did not run the encoder
        assertArrayEquals(cold.generation.tokens, warm.generation.tokens)
        val uncached = VlmSession(bundle, fake(), 0)
        assertArrayEquals(cold.generation.tokens, uncached.ask(image, q, 4).generation.tokens)
        // one changed byte changes the pixels, hence the key: a miss
        val changed = RgbImage(image.width, image.height, image.data.copyOf())
        changed.data[0] = (changed.data[0] + 1).toByte()
        assertFalse(session.ask(changed, q, 4).generation.timings.imageCached)
        assertEquals(2, rt.encodes.size)
        assertEquals(2, session.imageCache.size)
    }

    @Test
    fun aFollowUpPrefillsOnlyItsQuestionAfterTheKeptPrefix() {
        // the rules of export/runtime.py PromptPrefix: the same image and text before it, still cached
        val rt = fake()
        val session = VlmSession(bundle, rt, 1)
        val first = session.ask(image, "What shape is in the image?", 4, stopAtEos = false)
        rt.inner.calls.clear()
        val follow = session.ask(image, "What color is the shape?", 4, stopAtEos = false)
        val fresh = VlmSession(bundle, fake(), 1).ask(image, "What color is the shape?", 4, stopAtEos = false)
        assertFalse(first.generation.timings.prefixReused)
        assertTrue(follow.generation.timings.prefixReused && follow.generation.timings.imageCached)
        assertArrayEquals(fresh.generation.tokens, follow.generation.tokens) // as if the whole prompt were prefilled
        val ids = bundle.template.promptIds("What color is the shape?", bundle.tokenizer, withImage = true)
        val k = ids.indexOf(bundle.template.imageTokenIndex)
        val prefill = rt.inner.calls.first { it[0] == -3 }
        assertEquals(listOf(-3, k + bundle.model.numImageTokens, ids.size - k - 1), prefill) // after the image only
        assertEquals(ids.size - k - 1, follow.generation.timings.prefillPositions)
        val other = RgbImage(image.width, image.height, image.data.copyOf())
        other.data[0] = (other.data[0] + 1).toByte()
        assertFalse(session.ask(other, "What color is the shape?", 4).generation.timings.prefixReused) // evicts
        assertFalse(session.ask(image, "What color is the shape?", 4).generation.timings.prefixReused)
    }

    @Test
    fun anyImageSizeGoesThroughTheBundlesPreprocessing() {
        val s = bundle.preprocessing.imageSize
        for ((w, h) in listOf(Pair(30, 70), Pair(200, 90), Pair(s, s), Pair(1, 1))) {
            val data = ByteArray(w * h * 3) { ((it * 37 + w) % 251).toByte() }
            val img = RgbImage(w, h, data)
            val rt = fake()
            val session = VlmSession(bundle, rt)
            val px = session.pixels(img)
            assertArrayEquals(ImagePreprocessor.preprocess(img, bundle.preprocessing), px, 0f)
            session.ask(img, "What color is it?", 2)
            assertEquals(listOf(Pair(3 * s * s, s)), rt.encodes)
        }
    }

    @Test
    fun pixelsOfAnotherSizeAreRefusedBeforeCompute() {
        val rt = DecodeVectorsTest.FakeRuntime(512, 144, 2, null)
        val ids = bundle.template.promptIds("What shape?", bundle.tokenizer, withImage = true)
        try {
            Generator(rt, 144).generate(ids, FloatArray(3 * 40 * 40), 48, 4, listOf(2))
            fail("pixels of 40 x 40 for a 48 px encoder must be refused")
        } catch (e: GenerationException) {
            assertTrue(e.message!!, e.message!!.contains("3 x 48 x 48"))
        }
        assertTrue(rt.calls.isEmpty())
    }
}
