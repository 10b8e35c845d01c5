package org.alignkd.core

import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.security.MessageDigest

/**
 * The image tokens of the most recent images, least recently used evicted first: export/runtime.py
 * `ImageTokenCache`, same rules. Keyed by the sha256 of the preprocessed pixels as float32 little-endian
 * bytes in CHW order ([key], the Python key of the same pixels), so a follow-up question about the same
 * image skips the vision encoder and any change of the image or of its preprocessing is a miss.
 * Capacity 0 caches nothing.
 */
class ImageTokenCache(val capacity: Int = DEFAULT_CAPACITY) {
    init {
        require(capacity >= 0) { "image cache capacity must be >= 0, got $capacity" }
    }

    private val entries = LinkedHashMap<String, Embeddings>(16, 0.75f, true) // access order: LRU first

    val size: Int get() = entries.size

    /** Least recently used first. */
    fun keys(): List<String> = ArrayList(entries.keys)

    fun get(key: String): Embeddings? = entries[key]

    fun put(key: String, tokens: Embeddings) {
        if (capacity == 0) return
        entries[key] = Embeddings(tokens.rows, tokens.hidden, tokens.data.copyOf()) // a copy the caller cannot change
        while (entries.size > capacity) entries.remove(entries.keys.iterator().next())
    }

    fun clear() = entries.clear()

    companion object {
        const val DEFAULT_CAPACITY = 4

        fun key(pixels: FloatArray): String {
            val buf = ByteBuffer.allocate(pixels.size * 4).order(ByteOrder.LITTLE_ENDIAN)
            buf.asFloatBuffer().put(pixels)
            val digest = MessageDigest.getInstance("SHA-256").digest(buf.array())
            val sb = StringBuilder(64)
            for (b in digest) sb.append(String.format("%02x", b.toInt() and 0xFF))
            return sb.toString()
        }
    }
}
