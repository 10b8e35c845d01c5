package org.alignkd.core

import java.io.ByteArrayOutputStream
import java.util.PriorityQueue

/**
 * SentencePiece BPE encoding (and decoding) from a bundle's `tokenizer/vocab.json`, reproducing
 * `sentencepiece.SentencePieceProcessor.encode` for BPE models with the identity normalizer (LLaMA's and
 * MobileVLM's tokenizer, and the tiny test tokenizer):
 *
 *  - normalise: optional removal of extra spaces, " " → "▁", a "▁" dummy prefix (empty text → no ids);
 *  - split into characters (user-defined pieces whole), then repeatedly merge the adjacent pair whose
 *    concatenation is a piece with the highest score (ties: the leftmost pair), as bpe_model.cc does;
 *  - pieces of type "unused" are split back into the pieces they were merged from;
 *  - a symbol that is not a piece becomes `<unk>`, or with byte fallback its UTF-8 bytes `<0xXX>`.
 *
 * Control pieces (`<s>`, `</s>`) are never produced from text: "</s>" typed by a user stays text.
 */
class SentencePieceBpe(
    val pieces: List<String>,
    val scores: FloatArray,
    val types: IntArray,
    val addDummyPrefix: Boolean = true,
    val removeExtraWhitespaces: Boolean = false,
    val byteFallback: Boolean = true,
    val unkId: Int = 0,
    val bosId: Int = 1,
    val eosId: Int = 2
) {
    companion object {
        const val NORMAL = 1
        const val UNKNOWN = 2
        const val CONTROL = 3
        const val USER_DEFINED = 4
        const val BYTE = 6
        const val UNUSED = 5
        const val SPACE = "\u2581"

        /** Read vocab.json as written by alignkd's exporter (`sentencepiece_vocab`). */
        fun fromJson(m: Map<String, Any?>): SentencePieceBpe {
            val type = m["model_type"]
            if (type != "bpe") throw JsonException("vocab.json: model_type '$type' is not supported (only bpe)")
            val raw = J.list(m["pieces"], "pieces")
            val pieces = ArrayList<String>(raw.size)
            val scores = FloatArray(raw.size)
            val types = IntArray(raw.size)
            for ((i, p) in raw.withIndex()) {
                val t = J.list(p, "piece $i")
                pieces.add(t[0] as? String ?: throw JsonException("vocab.json: piece $i has no text"))
                scores[i] = (t[1] as Number).toFloat()
                types[i] = (t[2] as Number).toInt()
            }
            return SentencePieceBpe(pieces, scores, types,
                addDummyPrefix = J.bool(m, "add_dummy_prefix"),
                removeExtraWhitespaces = J.bool(m, "remove_extra_whitespaces"),
                byteFallback = J.bool(m, "byte_fallback"),
                unkId = J.int(m, "unk_id"), bosId = J.int(m, "bos_id"), eosId = J.int(m, "eos_id"))
        }
    }

    /** normal, user-defined and unused pieces: what merges may produce */
    private val normal = HashMap<String, Int>()
    /** unknown, control and byte pieces */
    private val reserved = HashMap<String, Int>()
    private val userDefined: List<String>
    private val byteIds = IntArray(256) { -1 }

    init {
        require(pieces.size == scores.size && pieces.size == types.size)
        val user = ArrayList<String>()
        for ((i, p) in pieces.withIndex()) {
            val t = types[i]
            val isNormal = t == NORMAL || t == USER_DEFINED || t == UNUSED
            val map = if (isNormal) normal else reserved
            require(!map.containsKey(p)) { "piece '$p' is defined twice" }
            map[p] = i
            if (t == USER_DEFINED) user.add(p)
            if (t == BYTE) {
                require(p.length == 6 && p.startsWith("<0x") && p.endsWith(">")) { "bad byte piece '$p'" }
                byteIds[Integer.parseInt(p.substring(3, 5), 16)] = i
            }
        }
        userDefined = user.sortedByDescending { it.length }
        if (byteFallback) require(byteIds.all { it >= 0 }) { "byte_fallback needs all 256 byte pieces" }
    }

    val vocabSize: Int get() = pieces.size

    fun pieceToId(p: String): Int = reserved[p] ?: normal[p] ?: unkId

    /** What SentencePiece's normalizer makes of [text] (identity rules, whitespace escaped). */
    fun normalize(text: String): String {
        var input = text
        if (removeExtraWhitespaces) input = input.trimStart(' ')
        if (input.isEmpty()) return ""
        val sb = StringBuilder()
        if (addDummyPrefix) sb.append(SPACE)
        var prevSpace = removeExtraWhitespaces
        for (c in input) {
            if (c == ' ') {
                if (!prevSpace) sb.append(SPACE)
                prevSpace = removeExtraWhitespaces
            } else {
                sb.append(c)
                prevSpace = false
            }
        }
        var out = sb.toString()
        if (removeExtraWhitespaces) while (out.endsWith(SPACE)) out = out.substring(0, out.length - SPACE.length)
        return out
    }

    private class Symbol(var start: Int, var len: Int, var prev: Int, var next: Int, val freeze: Boolean)
    private class Pair(val left: Int, val right: Int, val score: Float, val size: Int)

    /** Token ids of [text]: no BOS/EOS (as `sp.encode(text)`). */
    fun encode(text: String): IntArray {
        val norm = normalize(text)
        if (norm.isEmpty()) return IntArray(0)
        // split into characters (code points), user-defined pieces whole
        val symbols = ArrayList<Symbol>()
        var pos = 0
        while (pos < norm.length) {
            val user = userDefined.firstOrNull { norm.startsWith(it, pos) }
            val len = user?.length ?: Character.charCount(norm.codePointAt(pos))
            val idx = symbols.size
            symbols.add(Symbol(pos, len, idx - 1, if (pos + len < norm.length) idx + 1 else -1, user != null))
            pos += len
        }
        val agenda = PriorityQueue<Pair>(Comparator { a, b ->
            when {
                a.score != b.score -> if (a.score > b.score) -1 else 1
                else -> a.left.compareTo(b.left)
            }
        })
        val revMerge = HashMap<String, Array<String>>()

        fun piece(s: Symbol) = norm.substring(s.start, s.start + s.len)

        fun maybeAdd(left: Int, right: Int) {
            if (left == -1 || right == -1 || symbols[left].freeze || symbols[right].freeze) return
            val l = symbols[left]
            val r = symbols[right]
            val p = norm.substring(l.start, l.start + l.len + r.len)
            val id = normal[p] ?: return
            agenda.add(Pair(left, right, scores[id], p.length))
            if (types[id] == UNUSED) revMerge[p] = arrayOf(piece(l), piece(r))
        }

        for (i in 1 until symbols.size) maybeAdd(i - 1, i)
        while (agenda.isNotEmpty()) {
            val top = agenda.poll()
            val l = symbols[top.left]
            val r = symbols[top.right]
            if (l.len == 0 || r.len == 0 || l.len + r.len != top.size) continue
            l.len += r.len
            l.next = r.next
            if (r.next >= 0) symbols[r.next].prev = top.left
            r.len = 0
            maybeAdd(l.prev, top.left)
            maybeAdd(top.left, l.next)
        }

        val out = ArrayList<Int>()
        fun emit(p: String) {
            val id = pieceToId(p)
            if (id >= 0 && types[id] == UNUSED) {
                val parts = revMerge[p]
                if (parts != null) { emit(parts[0]); emit(parts[1]); return }
            }
            if (id == unkId && byteFallback) {
                for (b in p.toByteArray(Charsets.UTF_8)) out.add(byteIds[b.toInt() and 0xFF])
            } else {
                out.add(id)
            }
        }
        var i = 0
        while (i != -1) {
            emit(piece(symbols[i]))
            i = symbols[i].next
        }
        return out.toIntArray()
    }

    /**
     * Text of [ids] as `sp.decode` gives it: control pieces vanish, "▁" → " ", the dummy-prefix space of
     * the first piece is dropped, byte pieces are joined into UTF-8. With [complete] false, a trailing
     * incomplete UTF-8 sequence is held back (for streaming token by token).
     */
    fun decode(ids: IntArray, complete: Boolean = true): String {
        val sb = StringBuilder()
        val bytes = ByteArrayOutputStream()
        var bos = true
        fun flush(all: Boolean) {
            if (bytes.size() == 0) return
            val b = bytes.toByteArray()
            val keep = if (all) 0 else Utf8.incompleteTail(b, b.size)
            sb.append(String(b, 0, b.size - keep, Charsets.UTF_8))
            bytes.reset()
            if (keep > 0) bytes.write(b, b.size - keep, keep)
        }
        for (id in ids) {
            if (id < 0 || id >= pieces.size) throw IllegalArgumentException("token id $id is outside the vocabulary")
            val t = types[id]
            if (t == BYTE) {
                bytes.write(Integer.parseInt(pieces[id].substring(3, 5), 16))
                bos = false
                continue
            }
            flush(true)
            when (t) {
                CONTROL -> {}
                UNKNOWN -> { sb.append(" \u2047 "); bos = false }
                else -> {
                    var p = pieces[id]
                    if (bos && addDummyPrefix && p.startsWith(SPACE)) p = p.substring(SPACE.length)
                    sb.append(p.replace(SPACE, " "))
                    bos = false
                }
            }
        }
        flush(complete)
        return sb.toString()
    }
}
