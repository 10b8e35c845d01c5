package org.alignkd.demo

import org.alignkd.core.Embeddings
import org.alignkd.core.VlmRuntime
import org.pytorch.executorch.EValue
import org.pytorch.executorch.Module
import org.pytorch.executorch.Tensor
import java.io.Closeable
import java.io.File

/**
 * [VlmRuntime] over the bundle's `model.pte` (ExecuTorch's LLaVA contract, as alignkd's exporter writes it):
 *   vision_encoder  (1, 3, S, S) float  → (1, N, H)
 *   token_embedding (1, T) int64        → (1, T, H)
 *   text_decoder    (1, T, H) float, (1,) int64 start position → (1, V) logits of the last position,
 *                   with the KV cache inside the program (static size max_seq_len).
 * Mirrors export/executorch.py `PteRuntime`: start position 0 or the cache's length, never past max_seq_len.
 */
class ExecuTorchRuntime(pte: File, threads: Int = 0) : VlmRuntime, Closeable {
    private val module: Module = Module.load(pte.absolutePath, Module.LOAD_MODE_MMAP, threads)
    val maxSeqLen: Int
    private var pos = 0

    init {
        val methods = module.getMethods().toSet()
        for (m in METHODS) {
            require(m in methods) { "$pte has no method '$m' (methods: ${methods.sorted()}); export it with --target android" }
            // load now (timed as part of the load), not on the first question; older AARs return an error
            // code, newer ones throw
            val rc: Any = module.loadMethod(m)
            check(rc !is Int || rc == 0) { "ExecuTorch could not load method '$m' of $pte (error $rc)" }
        }
        maxSeqLen = constant("get_max_seq_len")?.toInt() ?: Int.MAX_VALUE
    }

    /** A constant method (`get_max_seq_len`, `get_bos_id`, ...), or null if the program has none. */
    fun constant(name: String): Long? =
        if (name in module.getMethods()) module.execute(name).firstOrNull()?.toInt()?.toLong() else null

    override fun encodeImage(pixels: FloatArray, imageSize: Int): Embeddings {
        val x = Tensor.fromBlob(pixels, longArrayOf(1, 3, imageSize.toLong(), imageSize.toLong()))
        return embeddings(module.execute("vision_encoder", EValue.from(x))[0].toTensor())
    }

    override fun embed(ids: LongArray): Embeddings {
        val x = Tensor.fromBlob(ids, longArrayOf(1, ids.size.toLong()))
        return embeddings(module.execute("token_embedding", EValue.from(x))[0].toTensor())
    }

    override fun decode(embeds: Embeddings, startPos: Int): FloatArray {
        // below pos: the static KV cache is overwritten from startPos (a follow-up after a kept prompt prefix)
        check(startPos <= pos) { "decode at position $startPos, but the cache holds $pos positions" }
        check(startPos + embeds.rows <= maxSeqLen) {
            "positions $startPos..${startPos + embeds.rows - 1} exceed max_seq_len $maxSeqLen"
        }
        val x = Tensor.fromBlob(embeds.data, longArrayOf(1, embeds.rows.toLong(), embeds.hidden.toLong()))
        val p = Tensor.fromBlob(longArrayOf(startPos.toLong()), longArrayOf(1))
        val out = module.execute("text_decoder", EValue.from(x), EValue.from(p))[0].toTensor()
        pos = startPos + embeds.rows
        return out.dataAsFloatArray // (1, V) → V values; a copy, the method reuses its output memory
    }

    private fun embeddings(t: Tensor): Embeddings {
        val shape = t.shape() // (1, N, H)
        require(shape.size == 3 && shape[0] == 1L) { "expected a (1, N, H) output, got ${shape.toList()}" }
        return Embeddings(shape[1].toInt(), shape[2].toInt(), t.dataAsFloatArray)
    }

    override fun close() {
        module.destroy()
    }

    companion object {
        val METHODS = listOf("vision_encoder", "token_embedding", "text_decoder")
    }
}
