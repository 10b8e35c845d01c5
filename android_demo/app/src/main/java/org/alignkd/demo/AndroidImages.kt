package org.alignkd.demo

import android.content.Context
import android.graphics.Bitmap
import android.graphics.BitmapFactory
import android.net.Uri
import org.alignkd.core.RgbImage
import java.io.File

/**
 * Decoding to [RgbImage] as PIL does for the Python side: full resolution, no EXIF rotation (PIL's
 * `Image.open` applies none either), alpha dropped without compositing (so decode unpremultiplied).
 * All the resizing happens in the core's PIL-exact preprocessing, never in Android's scaler.
 */
object AndroidImages {
    private fun options() = BitmapFactory.Options().apply {
        inPreferredConfig = Bitmap.Config.ARGB_8888
        inPremultiplied = false
        inScaled = false
    }

    fun fromBitmap(bmp: Bitmap): RgbImage {
        val b = if (bmp.config == Bitmap.Config.ARGB_8888) bmp else bmp.copy(Bitmap.Config.ARGB_8888, false)
        val px = IntArray(b.width * b.height)
        b.getPixels(px, 0, b.width, 0, 0, b.width, b.height)
        return RgbImage.fromArgb(b.width, b.height, px)
    }

    fun load(context: Context, uri: Uri): Pair<RgbImage, Bitmap> {
        val bmp = context.contentResolver.openInputStream(uri).use { BitmapFactory.decodeStream(it, null, options()) }
            ?: throw IllegalArgumentException("cannot decode the image $uri")
        return Pair(fromBitmap(bmp), bmp)
    }

    fun load(file: File): Pair<RgbImage, Bitmap> {
        val bmp = BitmapFactory.decodeFile(file.absolutePath, options())
            ?: throw IllegalArgumentException("cannot decode the image $file")
        return Pair(fromBitmap(bmp), bmp)
    }

    fun loadAsset(context: Context, name: String): Pair<RgbImage, Bitmap> {
        val bmp = context.assets.open(name).use { BitmapFactory.decodeStream(it, null, options()) }
            ?: throw IllegalArgumentException("cannot decode the asset $name")
        return Pair(fromBitmap(bmp), bmp)
    }
}
