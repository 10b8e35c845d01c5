package org.alignkd.core

import java.awt.image.IndexColorModel
import java.io.File
import java.security.MessageDigest
import java.util.Base64
import javax.imageio.ImageIO

/**
 * The shared test vectors written by the Python side (`.venv/bin/python tests/export/helpers/export_vectors.py DIR`), committed
 * in src/test/resources/vectors. Found through -Dvectors.dir, else relative to the working directory
 * (Gradle runs tests in the module directory; test.sh passes the property).
 */
object Vectors {
    val dir: File by lazy {
        val prop = System.getProperty("vectors.dir")
        val candidates = listOfNotNull(prop, "src/test/resources/vectors", "core/src/test/resources/vectors",
            "android_demo/core/src/test/resources/vectors")
        candidates.map { File(it) }.firstOrNull { File(it, "images.json").isFile }
            ?: throw IllegalStateException("test vectors not found (tried $candidates); set -Dvectors.dir")
    }

    fun json(name: String): Map<String, Any?> = J.obj(Json.parse(File(dir, name).readBytes()), name)

    /** Decode an image file into RGB as PIL's `Image.open(...).convert("RGB")` does (no colour management). */
    fun loadRgb(file: File): RgbImage {
        val img = ImageIO.read(file) ?: throw IllegalArgumentException("cannot decode $file")
        val w = img.width
        val h = img.height
        val raster = img.raster
        val cm = img.colorModel
        val bands = raster.numBands
        val out = ByteArray(w * h * 3)
        val px = IntArray(bands)
        for (y in 0 until h) for (x in 0 until w) {
            raster.getPixel(x, y, px)
            val o = (y * w + x) * 3
            if (cm is IndexColorModel) {
                out[o] = cm.getRed(px[0]).toByte(); out[o + 1] = cm.getGreen(px[0]).toByte(); out[o + 2] = cm.getBlue(px[0]).toByte()
            } else if (bands <= 2) { // gray (+ alpha)
                out[o] = px[0].toByte(); out[o + 1] = px[0].toByte(); out[o + 2] = px[0].toByte()
            } else { // RGB (+ alpha, dropped as PIL does)
                out[o] = px[0].toByte(); out[o + 1] = px[1].toByte(); out[o + 2] = px[2].toByte()
            }
        }
        return RgbImage(w, h, out)
    }

    fun sha256(bytes: ByteArray): String = BundleReader.hex(MessageDigest.getInstance("SHA-256").digest(bytes))

    fun copyTree(src: File, dst: File) {
        src.walkTopDown().forEach { f ->
            val rel = f.relativeTo(src).path
            val target = File(dst, rel)
            if (f.isDirectory) target.mkdirs() else f.copyTo(target, overwrite = true)
        }
    }

    fun applyOps(root: File, ops: List<Any?>) {
        for (o in ops) {
            val op = J.obj(o, "op")
            val f = File(root, J.str(op, "path"))
            when (J.str(op, "op")) {
                "delete" -> check(f.delete()) { "cannot delete $f" }
                "write" -> { f.parentFile.mkdirs(); f.writeBytes(Base64.getDecoder().decode(J.str(op, "base64"))) }
                else -> throw IllegalArgumentException("unknown op $op")
            }
        }
    }

    fun tempDir(prefix: String): File = java.nio.file.Files.createTempDirectory(prefix).toFile()
}
