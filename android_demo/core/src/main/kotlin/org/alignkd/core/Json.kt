package org.alignkd.core

/**
 * A small strict JSON reader and writer (no dependency, Android and plain JVM alike).
 *
 * The reader accepts exactly what Python's `json.loads` accepts, so that a manifest the Python
 * reader calls "not valid JSON" is refused here too: RFC 8259 plus Python's `NaN`, `Infinity` and
 * `-Infinity`; no trailing commas, no comments, no control characters inside strings, nothing but
 * whitespace after the value, and no byte-order mark. Duplicate keys keep the last value.
 *
 * Values: objects are [LinkedHashMap]s (key order kept), arrays are [List]s, integers are [Long]
 * (or [Double] past the Long range), other numbers [Double], plus [String], [Boolean] and null.
 */
class JsonException(message: String) : Exception(message)

object Json {
    fun parse(text: String): Any? = Parser(text).parseDocument()

    /** Strict UTF-8 (malformed bytes are an error, as Python's decoder makes them) then [parse]. */
    fun parse(bytes: ByteArray): Any? = parse(Utf8.decodeStrict(bytes))

    fun write(value: Any?, indent: Int = 0): String {
        val sb = StringBuilder()
        writeValue(sb, value, indent, 0)
        return sb.toString()
    }

    private fun writeValue(sb: StringBuilder, v: Any?, indent: Int, level: Int) {
        when (v) {
            null -> sb.append("null")
            is String -> writeString(sb, v)
            is Boolean -> sb.append(if (v) "true" else "false")
            is Double -> sb.append(formatDouble(v))
            is Float -> sb.append(formatDouble(v.toDouble()))
            is Number -> sb.append(v.toLong().toString())
            is Map<*, *> -> {
                if (v.isEmpty()) { sb.append("{}"); return }
                sb.append('{')
                var first = true
                for ((k, x) in v) {
                    if (!first) sb.append(',')
                    first = false
                    newline(sb, indent, level + 1)
                    writeString(sb, k.toString())
                    sb.append(if (indent > 0) ": " else ":")
                    writeValue(sb, x, indent, level + 1)
                }
                newline(sb, indent, level)
                sb.append('}')
            }
            is Iterable<*> -> {
                val items = v.toList()
                if (items.isEmpty()) { sb.append("[]"); return }
                sb.append('[')
                for ((i, x) in items.withIndex()) {
                    if (i > 0) sb.append(',')
                    newline(sb, indent, level + 1)
                    writeValue(sb, x, indent, level + 1)
                }
                newline(sb, indent, level)
                sb.append(']')
            }
            is IntArray -> writeValue(sb, v.toList(), indent, level)
            is LongArray -> writeValue(sb, v.toList(), indent, level)
            is FloatArray -> writeValue(sb, v.toList(), indent, level)
            is DoubleArray -> writeValue(sb, v.toList(), indent, level)
            else -> throw IllegalArgumentException("cannot write ${v.javaClass.name} as JSON")
        }
    }

    private fun newline(sb: StringBuilder, indent: Int, level: Int) {
        if (indent <= 0) return
        sb.append('\n')
        for (i in 0 until indent * level) sb.append(' ')
    }

    /** Finite doubles as Java prints them (round-trip exact); NaN/Infinity as Python writes them. */
    private fun formatDouble(d: Double): String = when {
        d.isNaN() -> "NaN"
        d == Double.POSITIVE_INFINITY -> "Infinity"
        d == Double.NEGATIVE_INFINITY -> "-Infinity"
        else -> d.toString()
    }

    private fun writeString(sb: StringBuilder, s: String) {
        sb.append('"')
        for (c in s) {
            when (c) {
                '"' -> sb.append("\\\"")
                '\\' -> sb.append("\\\\")
                '\n' -> sb.append("\\n")
                '\r' -> sb.append("\\r")
                '\t' -> sb.append("\\t")
                '\b' -> sb.append("\\b")
                '\u000C' -> sb.append("\\f")
                else -> if (c < ' ') sb.append(String.format("\\u%04x", c - '\u0000')) else sb.append(c)
            }
        }
        sb.append('"')
    }

    private class Parser(val s: String) {
        var i = 0

        fun fail(msg: String): Nothing = throw JsonException("$msg at character $i")

        fun parseDocument(): Any? {
            if (s.isNotEmpty() && s[0] == '\uFEFF') fail("unexpected byte-order mark")
            skipWs()
            val v = parseValue()
            skipWs()
            if (i != s.length) fail("extra data")
            return v
        }

        fun skipWs() {
            while (i < s.length) {
                val c = s[i]
                if (c == ' ' || c == '\t' || c == '\n' || c == '\r') i++ else break
            }
        }

        fun parseValue(): Any? {
            if (i >= s.length) fail("expecting value")
            val c = s[i]
            return when {
                c == '{' -> parseObject()
                c == '[' -> parseArray()
                c == '"' -> parseString()
                s.startsWith("true", i) -> { i += 4; true }
                s.startsWith("false", i) -> { i += 5; false }
                s.startsWith("null", i) -> { i += 4; null }
                s.startsWith("NaN", i) -> { i += 3; Double.NaN }
                s.startsWith("Infinity", i) -> { i += 8; Double.POSITIVE_INFINITY }
                s.startsWith("-Infinity", i) -> { i += 9; Double.NEGATIVE_INFINITY }
                c == '-' || c in '0'..'9' -> parseNumber()
                else -> fail("expecting value")
            }
        }

        fun parseObject(): Map<String, Any?> {
            val out = LinkedHashMap<String, Any?>()
            i++ // {
            skipWs()
            if (i < s.length && s[i] == '}') { i++; return out }
            while (true) {
                skipWs()
                if (i >= s.length || s[i] != '"') fail("expecting property name enclosed in double quotes")
                val key = parseString()
                skipWs()
                if (i >= s.length || s[i] != ':') fail("expecting ':' delimiter")
                i++
                skipWs()
                out[key] = parseValue()
                skipWs()
                if (i >= s.length) fail("expecting ',' delimiter")
                when (s[i]) {
                    ',' -> i++
                    '}' -> { i++; return out }
                    else -> fail("expecting ',' delimiter")
                }
            }
        }

        fun parseArray(): List<Any?> {
            val out = ArrayList<Any?>()
            i++ // [
            skipWs()
            if (i < s.length && s[i] == ']') { i++; return out }
            while (true) {
                skipWs()
                out.add(parseValue())
                skipWs()
                if (i >= s.length) fail("expecting ',' delimiter")
                when (s[i]) {
                    ',' -> i++
                    ']' -> { i++; return out }
                    else -> fail("expecting ',' delimiter")
                }
            }
        }

        fun parseString(): String {
            i++ // opening quote
            val sb = StringBuilder()
            while (true) {
                if (i >= s.length) fail("unterminated string")
                val c = s[i++]
                when {
                    c == '"' -> return sb.toString()
                    c == '\\' -> {
                        if (i >= s.length) fail("unterminated string")
                        when (s[i++]) {
                            '"' -> sb.append('"')
                            '\\' -> sb.append('\\')
                            '/' -> sb.append('/')
                            'b' -> sb.append('\b')
                            'f' -> sb.append('\u000C')
                            'n' -> sb.append('\n')
                            'r' -> sb.append('\r')
                            't' -> sb.append('\t')
                            'u' -> {
                                if (i + 4 > s.length) fail("invalid \\uXXXX escape")
                                val hex = s.substring(i, i + 4)
                                if (!hex.all { it in '0'..'9' || it in 'a'..'f' || it in 'A'..'F' }) fail("invalid \\uXXXX escape")
                                sb.appendCodePoint(Integer.parseInt(hex, 16))
                                i += 4
                            }
                            else -> { i--; fail("invalid \\escape") }
                        }
                    }
                    c < ' ' -> { i--; fail("invalid control character") }
                    else -> sb.append(c)
                }
            }
        }

        fun parseNumber(): Any {
            val start = i
            if (s[i] == '-') i++
            if (i >= s.length) fail("expecting value")
            if (s[i] == '0') i++
            else if (s[i] in '1'..'9') { while (i < s.length && s[i] in '0'..'9') i++ }
            else fail("expecting value")
            var integer = true
            if (i + 1 < s.length && s[i] == '.' && s[i + 1] in '0'..'9') {
                integer = false
                i++
                while (i < s.length && s[i] in '0'..'9') i++
            }
            if (i < s.length && (s[i] == 'e' || s[i] == 'E')) {
                var j = i + 1
                if (j < s.length && (s[j] == '+' || s[j] == '-')) j++
                if (j < s.length && s[j] in '0'..'9') {
                    integer = false
                    while (j < s.length && s[j] in '0'..'9') j++
                    i = j
                }
            }
            val text = s.substring(start, i)
            if (integer) {
                val asLong = text.toLongOrNull()
                if (asLong != null) return asLong
            }
            return text.toDouble()
        }
    }
}

/** Typed access to parsed JSON, with errors that name the field. */
object J {
    fun obj(v: Any?, what: String): Map<String, Any?> {
        if (v !is Map<*, *>) throw JsonException("$what must be a JSON object")
        @Suppress("UNCHECKED_CAST")
        return v as Map<String, Any?>
    }

    fun list(v: Any?, what: String): List<Any?> = v as? List<Any?> ?: throw JsonException("$what must be a JSON array")

    fun str(m: Map<String, Any?>, key: String): String =
        m[key] as? String ?: throw JsonException("field '$key' must be a string")

    fun int(m: Map<String, Any?>, key: String): Int = num(m[key], key).let {
        if (it is Long) it.toInt() else throw JsonException("field '$key' must be an integer")
    }

    fun double(m: Map<String, Any?>, key: String): Double = num(m[key], key).toDouble()

    fun bool(m: Map<String, Any?>, key: String): Boolean =
        m[key] as? Boolean ?: throw JsonException("field '$key' must be true or false")

    fun ints(m: Map<String, Any?>, key: String): List<Int> = list(m[key], "field '$key'").map {
        if (it is Long) it.toInt() else throw JsonException("field '$key' must hold integers")
    }

    fun doubles(m: Map<String, Any?>, key: String): List<Double> = list(m[key], "field '$key'").map {
        (it as? Number ?: throw JsonException("field '$key' must hold numbers")).toDouble()
    }

    private fun num(v: Any?, key: String): Number =
        if (v is Number) v else throw JsonException("field '$key' must be a number")
}

/** Strict UTF-8 decoding, and the length of a trailing incomplete sequence (for streaming text). */
object Utf8 {
    fun decodeStrict(bytes: ByteArray): String {
        val dec = Charsets.UTF_8.newDecoder()
            .onMalformedInput(java.nio.charset.CodingErrorAction.REPORT)
            .onUnmappableCharacter(java.nio.charset.CodingErrorAction.REPORT)
        try {
            return dec.decode(java.nio.ByteBuffer.wrap(bytes)).toString()
        } catch (e: java.nio.charset.CharacterCodingException) {
            throw JsonException("not valid UTF-8: ${e.message}")
        }
    }

    /** How many bytes at the end of [b] (within [0, n)) start a UTF-8 sequence that is not complete yet. */
    fun incompleteTail(b: ByteArray, n: Int): Int {
        var k = 1
        while (k <= 3 && k <= n) {
            val x = b[n - k].toInt() and 0xFF
            if (x and 0xC0 != 0x80) { // a lead byte (or ASCII)
                val need = when {
                    x and 0x80 == 0 -> 1
                    x and 0xE0 == 0xC0 -> 2
                    x and 0xF0 == 0xE0 -> 3
                    x and 0xF8 == 0xF0 -> 4
                    else -> 1
                }
                return if (need > k) k else 0
            }
            k++
        }
        return 0
    }
}
