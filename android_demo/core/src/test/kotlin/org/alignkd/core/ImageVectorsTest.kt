package org.alignkd.core

import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Test
import java.io.File

/** Pixels equal to the Python preprocessing (alignkd/data/image.py) for every image and config. */
class ImageVectorsTest {
    private val spec = Vectors.json("images.json")
    private val configs = J.obj(spec["configs"], "configs").mapValues { PreprocessingConfig.fromJson(J.obj(it.value, it.key)) }
    private val images = J.list(spec["images"], "images").map { J.obj(it, "image") }
    private val imgDir = File(Vectors.dir, "images")

    private fun lossless(e: Map<String, Any?>) = !J.str(e, "file").endsWith(".jpg")

    @Test
    fun decodedRgbEqualsPil() {
        for (e in images.filter { lossless(it) }) {
            val img = Vectors.loadRgb(File(imgDir, J.str(e, "file")))
            assertEquals(J.int(e, "width"), img.width)
            assertEquals(J.int(e, "height"), img.height)
            assertEquals("decoded RGB of ${e["file"]}", J.str(e, "rgb_sha256"), Vectors.sha256(img.data))
        }
    }

    @Test
    fun uint8CropsAreBitExact() {
        var checked = 0
        for (e in images.filter { lossless(it) }) {
            val img = Vectors.loadRgb(File(imgDir, J.str(e, "file")))
            for ((key, r) in J.obj(e["results"], "results")) {
                val res = J.obj(r, key)
                val crop = ImagePreprocessor.resizeAndCrop(img, configs.getValue(key))
                if (res.containsKey("u8_hwc")) {
                    val want = J.ints(res, "u8_hwc")
                    val got = crop.data.map { it.toInt() and 0xFF }
                    var diff = 0
                    for (i in want.indices) diff = maxOf(diff, Math.abs(want[i] - got[i]))
                    assertEquals("${e["file"]} / $key: max uint8 difference", 0, diff)
                }
                assertEquals("${e["file"]} / $key: uint8 crop sha256", J.str(res, "u8_sha256"), Vectors.sha256(crop.data))
                checked++
            }
        }
        println("images: $checked (image, config) uint8 crops bit-exact")
        assertTrue(checked >= 30)
    }

    @Test
    fun normalisedPixelsMatch() {
        var maxDiff = 0.0
        var maxStat = 0.0
        var full = 0
        for (e in images.filter { lossless(it) }) {
            val img = Vectors.loadRgb(File(imgDir, J.str(e, "file")))
            for ((key, r) in J.obj(e["results"], "results")) {
                val res = J.obj(r, key)
                val cfg = configs.getValue(key)
                val x = ImagePreprocessor.preprocess(img, cfg)
                val n = cfg.imageSize * cfg.imageSize
                assertEquals(3 * n, x.size)
                val mean = J.doubles(res, "mean")
                val std = J.doubles(res, "std")
                for (c in 0 until 3) {
                    var s = 0.0
                    for (i in 0 until n) s += x[c * n + i]
                    val m = s / n
                    var v = 0.0
                    for (i in 0 until n) v += (x[c * n + i] - m) * (x[c * n + i] - m)
                    maxStat = maxOf(maxStat, Math.abs(m - mean[c]), Math.abs(Math.sqrt(v / n) - std[c]))
                }
                if (res.containsKey("pixels_chw")) {
                    val want = J.doubles(res, "pixels_chw")
                    // written as the shortest decimal of each float32: read back as float32, then compare
                    for (i in want.indices) maxDiff = maxOf(maxDiff, Math.abs((want[i].toFloat() - x[i]).toDouble()))
                    full++
                }
            }
        }
        println("images: full tensors ($full) max |diff| = $maxDiff; per-channel mean/std max |diff| = $maxStat")
        assertTrue(full >= 2)
        assertEquals("pixels differ from Python", 0.0, maxDiff, 0.0)
        assertEquals("channel statistics differ from Python", 0.0, maxStat, 1e-9)
    }

    /** JPEG: javax.imageio's decoder (the test's stand-in for Android's) against PIL's libjpeg decode. */
    @Test
    fun jpegThroughTheJvmDecoder() {
        val e = images.first { J.str(it, "file") == "photo.jpg" }
        val jvm = Vectors.loadRgb(File(imgDir, "photo.jpg"))
        val pil = Vectors.loadRgb(File(imgDir, "photo.decoded.png"))
        assertEquals(J.str(e, "rgb_sha256"), Vectors.sha256(pil.data))
        var maxU8 = 0
        for (i in jvm.data.indices) maxU8 = maxOf(maxU8, Math.abs((jvm.data[i].toInt() and 0xFF) - (pil.data[i].toInt() and 0xFF)))
        val cfg = configs.getValue("tiny48")
        val a = ImagePreprocessor.preprocess(jvm, cfg)
        val b = ImagePreprocessor.preprocess(pil, cfg)
        var maxPx = 0.0
        for (i in a.indices) maxPx = maxOf(maxPx, Math.abs((a[i] - b[i]).toDouble()))
        println("images: JPEG decoded by javax.imageio vs PIL: max uint8 diff $maxU8, max pixel diff after preprocessing $maxPx")
        // decoders may round the IDCT / chroma upsampling differently; the file's own PIL decode is checked exactly above
        assertTrue("JPEG decoders disagree by $maxU8 levels", maxU8 <= 8)
    }

    @Test
    fun expandToSquarePlacesImageLikePil() {
        val img = RgbImage.filled(3, 1, 10, 20, 30)
        val sq = ImagePreprocessor.expandToSquare(img, intArrayOf(1, 2, 3))
        assertEquals(3, sq.width)
        assertArrayEquals(intArrayOf(1, 2, 3), IntArray(3) { sq.get(0, 0, it) })
        assertArrayEquals(intArrayOf(10, 20, 30), IntArray(3) { sq.get(2, 1, it) })
        val tall = ImagePreprocessor.expandToSquare(RgbImage.filled(1, 4, 9, 9, 9), intArrayOf(0, 0, 0))
        assertEquals(9, tall.get(1, 0, 0)) // left = (4 - 1) / 2 = 1
        assertEquals(0, tall.get(0, 0, 0))
    }
}
