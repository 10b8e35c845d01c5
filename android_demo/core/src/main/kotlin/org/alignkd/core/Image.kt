package org.alignkd.core

import kotlin.math.PI
import kotlin.math.ceil
import kotlin.math.sin

/** An 8-bit RGB image, row-major, 3 bytes per pixel (R, G, B): what PIL's `convert("RGB")` holds. */
class RgbImage(val width: Int, val height: Int, val data: ByteArray) {
    init {
        require(width > 0 && height > 0) { "image must not be empty, got ${width}x$height" }
        require(data.size == width * height * 3) { "RGB data has ${data.size} bytes, expected ${width * height * 3}" }
    }

    fun get(x: Int, y: Int, c: Int): Int = data[(y * width + x) * 3 + c].toInt() and 0xFF

    companion object {
        /**
         * From packed 0xAARRGGBB ints (Android `Bitmap.getPixels`, Java `BufferedImage.getRGB`). Alpha is
         * dropped, as PIL's RGBA → RGB conversion does (no compositing onto a background). On Android,
         * decode with `inPremultiplied = false` so that colours under partial alpha stay unscaled.
         */
        fun fromArgb(width: Int, height: Int, argb: IntArray): RgbImage {
            val out = ByteArray(width * height * 3)
            for (i in 0 until width * height) {
                val p = argb[i]
                out[3 * i] = (p shr 16).toByte()
                out[3 * i + 1] = (p shr 8).toByte()
                out[3 * i + 2] = p.toByte()
            }
            return RgbImage(width, height, out)
        }

        /** From 8-bit gray levels (PIL "L" → "RGB" repeats the level). */
        fun fromGray(width: Int, height: Int, gray: ByteArray): RgbImage {
            val out = ByteArray(width * height * 3)
            for (i in 0 until width * height) {
                out[3 * i] = gray[i]; out[3 * i + 1] = gray[i]; out[3 * i + 2] = gray[i]
            }
            return RgbImage(width, height, out)
        }

        fun filled(width: Int, height: Int, r: Int, g: Int, b: Int): RgbImage {
            val out = ByteArray(width * height * 3)
            for (i in 0 until width * height) {
                out[3 * i] = r.toByte(); out[3 * i + 1] = g.toByte(); out[3 * i + 2] = b.toByte()
            }
            return RgbImage(width, height, out)
        }
    }
}

/** `preprocessing.json` of a bundle: alignkd's ImageProcessingConfig. */
class PreprocessingConfig(
    val imageSize: Int,
    val imageMean: DoubleArray,
    val imageStd: DoubleArray,
    val padToSquare: Boolean,
    val resample: String
) {
    init {
        require(imageSize > 0) { "image_size must be positive, got $imageSize" }
        require(imageMean.size == 3 && imageStd.size == 3) { "image_mean and image_std must have 3 values" }
        require(imageStd.all { it > 0 }) { "image_std must be positive" }
        require(resample in PilResize.FILTERS) { "resample must be one of ${PilResize.FILTERS.keys}, got '$resample'" }
    }

    /** The padding colour as MobileVLM computes it: int(mean * 255) → (122, 116, 104) for CLIP. */
    val background: IntArray get() = IntArray(3) { (imageMean[it] * 255).toInt() }

    companion object {
        val KNOWN = setOf("image_size", "image_mean", "image_std", "pad_to_square", "resample")

        fun fromJson(m: Map<String, Any?>): PreprocessingConfig {
            val unknown = m.keys - KNOWN
            if (unknown.isNotEmpty()) throw JsonException("preprocessing.json: unknown field(s) ${unknown.sorted()}")
            return PreprocessingConfig(
                J.int(m, "image_size"),
                J.doubles(m, "image_mean").toDoubleArray(),
                J.doubles(m, "image_std").toDoubleArray(),
                if (m.containsKey("pad_to_square")) J.bool(m, "pad_to_square") else true,
                (m["resample"] as? String) ?: "bicubic"
            )
        }
    }
}

/**
 * MobileVLM's pixels, exactly as alignkd/data/image.py `preprocess` computes them (which equals HF's
 * CLIPImageProcessor after MobileVLM's expand2square):
 *   1. pad to a square with [PreprocessingConfig.background], the image pasted at ((side-w)/2, (side-h)/2);
 *   2. resize the shortest edge to S (other edge int(S * long / short)) with PIL's resampling ([PilResize]);
 *   3. centre crop S x S at ((h-S)/2, (w-S)/2);
 *   4. x/255 in double, to float, then (x - mean) / std in float; CHW order.
 */
object ImagePreprocessor {
    fun expandToSquare(img: RgbImage, background: IntArray): RgbImage {
        if (img.width == img.height) return img
        val side = maxOf(img.width, img.height)
        val out = RgbImage.filled(side, side, background[0], background[1], background[2])
        val x0 = (side - img.width) / 2
        val y0 = (side - img.height) / 2
        for (y in 0 until img.height) {
            System.arraycopy(img.data, y * img.width * 3, out.data, ((y + y0) * side + x0) * 3, img.width * 3)
        }
        return out
    }

    /** Steps 1-3: the uint8 S x S image that gets normalised. */
    fun resizeAndCrop(img: RgbImage, cfg: PreprocessingConfig): RgbImage {
        var im = if (cfg.padToSquare) expandToSquare(img, cfg.background) else img
        val s = cfg.imageSize
        val w = im.width
        val h = im.height
        if (w != s || h != s) {
            val newW: Int
            val newH: Int
            if (w <= h) {
                newW = s; newH = ((s.toLong() * h).toDouble() / w).toInt()
            } else {
                newW = ((s.toLong() * w).toDouble() / h).toInt(); newH = s
            }
            im = PilResize.resize(im, newW, newH, cfg.resample)
        }
        if (im.width == s && im.height == s) return im
        val top = (im.height - s) / 2
        val left = (im.width - s) / 2
        val out = ByteArray(s * s * 3)
        for (y in 0 until s) System.arraycopy(im.data, ((top + y) * im.width + left) * 3, out, y * s * 3, s * 3)
        return RgbImage(s, s, out)
    }

    /** Step 4 on an S x S image: float32 CHW. */
    fun normalize(img: RgbImage, cfg: PreprocessingConfig): FloatArray {
        val n = img.width * img.height
        val out = FloatArray(3 * n)
        val mean = FloatArray(3) { cfg.imageMean[it].toFloat() }
        val std = FloatArray(3) { cfg.imageStd[it].toFloat() }
        val scale = 1.0 / 255
        // the 256 possible values per channel, computed as numpy does (float64 multiply, cast, float32 ops)
        val lut = Array(3) { c -> FloatArray(256) { v -> ((v * scale).toFloat() - mean[c]) / std[c] } }
        for (i in 0 until n) {
            for (c in 0 until 3) out[c * n + i] = lut[c][img.data[3 * i + c].toInt() and 0xFF]
        }
        return out
    }

    /** The whole pipeline: decoded RGB → (3, S, S) float32, flattened CHW (batch dimension implied). */
    fun preprocess(img: RgbImage, cfg: PreprocessingConfig): FloatArray = normalize(resizeAndCrop(img, cfg), cfg)
}

/**
 * PIL's `Image.resize` for 8-bit RGB with a convolution filter (Pillow's Resample.c): separable, antialiased
 * (the filter support grows with the downscale factor), coefficients normalised and then converted to 22-bit
 * fixed point, a horizontal pass into an 8-bit image, then a vertical pass, each rounded and clipped as PIL
 * does. Matches PIL to the bit.
 */
object PilResize {
    private const val PRECISION_BITS = 32 - 8 - 2

    class Filter(val support: Double, val f: (Double) -> Double)

    private fun bicubic(x0: Double): Double {
        val a = -0.5
        val x = if (x0 < 0.0) -x0 else x0
        if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
        if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a
        return 0.0
    }

    private fun bilinear(x0: Double): Double {
        val x = if (x0 < 0.0) -x0 else x0
        return if (x < 1.0) 1.0 - x else 0.0
    }

    private fun sinc(x0: Double): Double {
        if (x0 == 0.0) return 1.0
        val x = x0 * PI
        return sin(x) / x
    }

    private fun lanczos(x: Double): Double = if (-3.0 <= x && x < 3.0) sinc(x) * sinc(x / 3) else 0.0

    val FILTERS: Map<String, Filter> = mapOf(
        "bicubic" to Filter(2.0, ::bicubic),
        "bilinear" to Filter(1.0, ::bilinear),
        "lanczos" to Filter(3.0, ::lanczos)
    )

    private class Coeffs(val ksize: Int, val bounds: IntArray, val kk: IntArray)

    private fun precompute(inSize: Int, outSize: Int, filter: Filter): Coeffs {
        val scale = inSize.toDouble() / outSize
        val filterscale = if (scale < 1.0) 1.0 else scale
        val support = filter.support * filterscale
        val ksize = ceil(support).toInt() * 2 + 1
        val bounds = IntArray(outSize * 2)
        val kk = IntArray(outSize * ksize)
        val k = DoubleArray(ksize)
        for (xx in 0 until outSize) {
            val center = (xx + 0.5) * scale
            var ww = 0.0
            val ss = 1.0 / filterscale
            var xmin = (center - support + 0.5).toInt()
            if (xmin < 0) xmin = 0
            var xmax = (center + support + 0.5).toInt()
            if (xmax > inSize) xmax = inSize
            xmax -= xmin
            for (x in 0 until ksize) k[x] = 0.0
            for (x in 0 until xmax) {
                val w = filter.f((x + xmin - center + 0.5) * ss)
                k[x] = w
                ww += w
            }
            for (x in 0 until xmax) if (ww != 0.0) k[x] /= ww
            for (x in 0 until ksize) {
                val v = k[x] * (1 shl PRECISION_BITS)
                kk[xx * ksize + x] = if (k[x] < 0) (-0.5 + v).toInt() else (0.5 + v).toInt()
            }
            bounds[2 * xx] = xmin
            bounds[2 * xx + 1] = xmax
        }
        return Coeffs(ksize, bounds, kk)
    }

    private fun clip8(v: Int): Int = when {
        v >= (1 shl PRECISION_BITS shl 8) -> 255
        v <= 0 -> 0
        else -> v shr PRECISION_BITS
    }

    fun resize(img: RgbImage, outW: Int, outH: Int, resample: String = "bicubic"): RgbImage {
        val filter = FILTERS[resample] ?: throw IllegalArgumentException("unsupported resample '$resample'")
        var cur = img
        if (outW != cur.width) {
            val c = precompute(cur.width, outW, filter)
            val out = ByteArray(outW * cur.height * 3)
            for (y in 0 until cur.height) {
                val row = y * cur.width * 3
                for (xx in 0 until outW) {
                    val xmin = c.bounds[2 * xx]
                    val xmax = c.bounds[2 * xx + 1]
                    val base = xx * c.ksize
                    for (ch in 0 until 3) {
                        var ss = 1 shl (PRECISION_BITS - 1)
                        for (x in 0 until xmax) ss += (cur.data[row + (x + xmin) * 3 + ch].toInt() and 0xFF) * c.kk[base + x]
                        out[(y * outW + xx) * 3 + ch] = clip8(ss).toByte()
                    }
                }
            }
            cur = RgbImage(outW, cur.height, out)
        }
        if (outH != cur.height) {
            val c = precompute(cur.height, outH, filter)
            val w = cur.width
            val out = ByteArray(w * outH * 3)
            for (yy in 0 until outH) {
                val ymin = c.bounds[2 * yy]
                val ymax = c.bounds[2 * yy + 1]
                val base = yy * c.ksize
                for (xx in 0 until w) {
                    for (ch in 0 until 3) {
                        var ss = 1 shl (PRECISION_BITS - 1)
                        for (y in 0 until ymax) ss += (cur.data[((y + ymin) * w + xx) * 3 + ch].toInt() and 0xFF) * c.kk[base + y]
                        out[(yy * w + xx) * 3 + ch] = clip8(ss).toByte()
                    }
                }
            }
            cur = RgbImage(w, outH, out)
        }
        return cur
    }
}
