package org.alignkd.core

import java.util.Random

/** A (rows x hidden) float32 matrix, row-major: image tokens or token embeddings. */
class Embeddings(val rows: Int, val hidden: Int, val data: FloatArray) {
    init {
        require(data.size == rows * hidden) { "embeddings: ${data.size} values for $rows x $hidden" }
    }

    fun row(i: Int): FloatArray = data.copyOfRange(i * hidden, (i + 1) * hidden)

    companion object {
        fun concat(parts: List<Embeddings>): Embeddings {
            val hidden = parts.first().hidden
            require(parts.all { it.hidden == hidden }) { "embeddings of different widths" }
            var size = 0
            var rows = 0
            for (p in parts) { size += p.data.size; rows += p.rows }
            val out = FloatArray(size)
            var off = 0
            for (p in parts) { System.arraycopy(p.data, 0, out, off, p.data.size); off += p.data.size }
            return Embeddings(rows, hidden, out)
        }
    }
}

/**
 * The three calls the app makes, exactly those of alignkd's Python `Runtime` (export/base.py) and of the
 * .pte's methods `vision_encoder`, `token_embedding` and `text_decoder`.
 */
interface VlmRuntime {
    /** (1, 3, S, S) normalised pixels (CHW, flattened) → (N, H) image tokens. */
    fun encodeImage(pixels: FloatArray, imageSize: Int): Embeddings

    /** (T,) token ids → (T, H) embeddings. */
    fun embed(ids: LongArray): Embeddings

    /**
     * (T, H) embeddings at positions startPos.. → (V,) logits of the last position. Earlier positions come
     * from the runtime's KV cache; a startPos below what it holds drops the positions from there on (0 starts
     * a new sequence; a follow-up question continues after a kept prompt prefix). Beyond it is an error.
     */
    fun decode(embeds: Embeddings, startPos: Int): FloatArray
}

class GenerationException(message: String) : Exception(message)

/**
 * Seconds, as export/runtime.py `generate` measures them, plus the time to the first token; [imageCached]:
 * the image tokens came from the [ImageTokenCache] (the encoder did not run).
 */
class Timings(
    val imageS: Double,
    val prefillS: Double,
    val decodeS: Double,
    val decodeSteps: Int,
    val ttftS: Double,
    val promptPositions: Int,
    val imageCached: Boolean = false,
    /** Only the text after the image was prefilled: the runtime's cache held the prompt up to the image. */
    val prefixReused: Boolean = false,
    /** Positions fed in the prefill (promptPositions, or the text after the image when [prefixReused]). */
    val prefillPositions: Int = promptPositions
) {
    val prefillTokS: Double get() = if (prefillS > 0) prefillPositions / prefillS else 0.0
    val decodeTokS: Double get() = if (decodeS > 0) decodeSteps / decodeS else 0.0
}

class Generation(val tokens: IntArray, val promptLen: Int, val timings: Timings, val stoppedByEos: Boolean)

/** Called with each new token as soon as it is chosen (for streaming); return false to stop early. */
interface TokenListener {
    fun onToken(token: Int, index: Int): Boolean
}

class SamplingConfig(val temperature: Double = 0.0, val topP: Double = 1.0, val seed: Long = 0)

/** Next-token choice: greedy at temperature 0 (first maximum, as torch.argmax), else softmax(logits/T) with top-p. */
class Sampler(val config: SamplingConfig) {
    private val random = Random(config.seed)

    fun next(logits: FloatArray): Int {
        if (config.temperature <= 0.0) return argmax(logits)
        val t = config.temperature
        var max = Double.NEGATIVE_INFINITY
        for (x in logits) if (x > max) max = x.toDouble()
        val p = DoubleArray(logits.size) { Math.exp((logits[it] - max) / t) }
        val sum = p.sum()
        for (i in p.indices) p[i] /= sum
        if (config.topP < 1.0) {
            val order = p.indices.sortedByDescending { p[it] }
            var cum = 0.0
            val keep = BooleanArray(p.size)
            for (i in order) {
                if (cum < config.topP) keep[i] = true // always keeps the most likely token
                cum += p[i]
            }
            for (i in p.indices) if (!keep[i]) p[i] = 0.0
        }
        val total = p.sum()
        var u = random.nextDouble() * total
        for (i in p.indices) {
            u -= p[i]
            if (u < 0 && p[i] > 0) return i
        }
        return p.indices.last { p[it] > 0 }
    }

    companion object {
        fun argmax(logits: FloatArray): Int {
            var best = 0
            for (i in 1 until logits.size) if (logits[i] > logits[best] || (logits[best].isNaN() && !logits[i].isNaN())) best = i
            return best
        }
    }
}

/**
 * The decoding loop of export/runtime.py `generate`, call for call: encode the image (or take its tokens
 * from [imageCache]), embed the prompt before and after the image token, splice, prefill at position 0,
 * then one token at a time at start positions promptLen, promptLen + 1, ...; stop at an EOS id (not
 * emitted) or after maxNewTokens. Pixels must be the (1, 3, S, S) of the bundle's preprocessing.
 *
 * With [imageCache], the rules of export/runtime.py `PromptPrefix` too: when the last prompt had the same
 * ids before the image and the same image (still in the cache), the runtime's KV cache holds that prefix,
 * and a follow-up prefills only its text after the image, at start position = the prefix's positions.
 */
class Generator(
    val runtime: VlmRuntime,
    val numImageTokens: Int,
    val imageTokenIndex: Int = -200,
    val maxSeqLen: Int? = null,
    private val clock: () -> Long = { System.nanoTime() },
    val imageCache: ImageTokenCache? = null
) {
    // what the runtime's KV cache holds of the last prompt: ids before its image, the image's key, positions
    private var prefixIds: IntArray? = null
    private var prefixKey: String? = null
    private var prefixPositions = 0

    /** How many positions a prompt occupies once its image token expands. */
    fun promptPositions(promptIds: IntArray): Int =
        promptIds.size + (numImageTokens - 1) * promptIds.count { it == imageTokenIndex }

    fun generate(
        promptIds: IntArray,
        pixels: FloatArray?,
        imageSize: Int,
        maxNewTokens: Int,
        eosIds: Collection<Int>,
        sampling: SamplingConfig = SamplingConfig(),
        listener: TokenListener? = null
    ): Generation {
        val nPrompt = promptPositions(promptIds)
        if (maxSeqLen != null && nPrompt + maxNewTokens > maxSeqLen) {
            // refuse before any compute: the static KV cache would overflow
            throw GenerationException("prompt of $nPrompt positions + $maxNewTokens new tokens exceeds max_seq_len $maxSeqLen")
        }
        val nImg = promptIds.count { it == imageTokenIndex }
        if (nImg > 1) throw GenerationException("at most one image per prompt is supported")
        if ((nImg == 1) != (pixels != null)) {
            throw GenerationException(if (nImg == 1) "the prompt has an image token but no image was given"
                                      else "an image was given but the prompt has no <image> token")
        }
        if (pixels != null && pixels.size != 3 * imageSize * imageSize) {
            // a runtime could take other-sized pixels silently; only the bundle's preprocessing makes them
            throw GenerationException("${pixels.size} pixel values, the encoder takes 3 x $imageSize x $imageSize: " +
                "preprocess the image with the bundle's preprocessing")
        }
        val sampler = Sampler(sampling)
        val t0 = clock()
        val embeds: Embeddings
        var cached = false
        var start = 0
        val k = promptIds.indexOf(imageTokenIndex)
        val key = if (nImg == 1 && imageCache != null) ImageTokenCache.key(pixels!!) else null
        val before = if (k >= 0) promptIds.copyOfRange(0, k) else null
        val reuse = key != null && k + 1 < promptIds.size && key == prefixKey && before!!.contentEquals(prefixIds ?: IntArray(0)) &&
            imageCache!!.get(key) != null
        if (reuse) { // the cache holds the prompt up to and including this image: prefill the new text only
            start = prefixPositions
            cached = true
            embeds = runtime.embed(promptIds.copyOfRange(k + 1, promptIds.size).toLongArrays())
        } else if (nImg == 0) {
            embeds = runtime.embed(promptIds.toLongArrays())
        } else {
            val hit = if (key != null) imageCache!!.get(key) else null
            cached = hit != null
            val image = hit ?: runtime.encodeImage(pixels!!, imageSize)
            if (image.rows != numImageTokens) {
                throw GenerationException("the vision encoder returned ${image.rows} tokens, the bundle says $numImageTokens")
            }
            if (key != null && !cached) imageCache!!.put(key, image)
            val parts = ArrayList<Embeddings>()
            val after = promptIds.copyOfRange(k + 1, promptIds.size)
            val eb = if (before!!.isNotEmpty()) runtime.embed(before.toLongArrays()) else null
            val ea = if (after.isNotEmpty()) runtime.embed(after.toLongArrays()) else null
            if (eb != null) parts.add(eb)
            parts.add(image)
            if (ea != null) parts.add(ea)
            embeds = Embeddings.concat(parts)
        }
        val t1 = clock()
        prefixKey = null // until this prefill has gone through
        var logits = runtime.decode(embeds, start)
        val t2 = clock()
        if (key != null) { prefixIds = before; prefixKey = key; prefixPositions = before!!.size + numImageTokens }
        var ttft = -1L
        val tokens = ArrayList<Int>()
        var pos = start + embeds.rows
        var eos = false
        for (step in 0 until maxNewTokens) {
            val tok = sampler.next(logits)
            if (ttft < 0) ttft = clock()
            if (tok in eosIds) { eos = true; break }
            tokens.add(tok)
            val more = listener?.onToken(tok, tokens.size - 1) ?: true
            if (tokens.size == maxNewTokens || !more) break
            logits = runtime.decode(runtime.embed(longArrayOf(tok.toLong())), pos)
            pos += 1
        }
        val t3 = clock()
        if (ttft < 0) ttft = t3
        val s = 1e-9
        val timings = Timings((t1 - t0) * s, (t2 - t1) * s, (t3 - t2) * s, maxOf(tokens.size - 1, 0), (ttft - t0) * s, nPrompt,
            cached, reuse, embeds.rows)
        return Generation(tokens.toIntArray(), nPrompt, timings, eos)
    }

    private fun IntArray.toLongArrays(): LongArray = LongArray(size) { this[it].toLong() }
}
